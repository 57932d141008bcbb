"""Whether a model folder declares Matryoshka embeddings, which may be cut to fewer dimensions.

A Matryoshka model is trained so that the first k features of its embedding are themselves a
good k-dimensional embedding; any other model's truncated vector is just a worse vector, which is
why a request's ``dimensions`` is refused for it rather than honoured. Two declarations count:

  config.json          ``matryoshka_dimensions: [768, 512, ...]`` or ``is_matryoshka: true``
                       (the keys vLLM reads, also set through its hf_overrides)
  README.md            the model card sentence-transformers writes after training: its
                       front matter tags the loss (``loss:MatryoshkaLoss`` or
                       ``loss:Matryoshka2dLoss``) and its training details list the loss
                       configuration, ``"matryoshka_dims": [768, 512, ...]``

sentence-transformers itself writes nothing about it into config_sentence_transformers.json (its
``truncate_dim`` is a load-time argument, never saved), so the card is where it says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_LOSS_TAG = re.compile(r"^\s*-\s*['\"]?loss:Matryoshka(?:2d)?Loss['\"]?\s*$", re.MULTILINE)
_DIMS = re.compile(r'"matryoshka_dims"\s*:\s*\[([^\]]*)\]')


@dataclass(frozen=True)
class Matryoshka:
    """``dims``: the trained sizes (None: any size up to the full one)."""

    dims: tuple[int, ...] | None
    source: str


def _front_matter(card: str) -> str:
    # The YAML block between the first two '---' lines; tags outside it are prose, not metadata.
    if not card.startswith("---"):
        return ""
    end = card.find("\n---", 3)
    return card[3:end] if end != -1 else ""


def _int_list(values, where: str) -> tuple[int, ...]:
    if not isinstance(values, list) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{where} must be a non-empty list of positive integers, got {values!r}")
    return tuple(sorted(set(values), reverse=True))


def read_matryoshka(path: str | Path, hf_config: dict) -> Matryoshka | None:
    """The folder's Matryoshka declaration, or None when it declares none."""
    if hf_config.get("matryoshka_dimensions") is not None:
        return Matryoshka(_int_list(hf_config["matryoshka_dimensions"], "config.json matryoshka_dimensions"),
                          "config.json")
    if hf_config.get("is_matryoshka") is True:
        return Matryoshka(None, "config.json")
    card_path = Path(path) / "README.md"
    try:
        card = card_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if not _LOSS_TAG.search(_front_matter(card)):
        return None
    dims: set[int] = set()
    for match in _DIMS.finditer(card):   # one list per Matryoshka loss of the training details
        try:
            dims.update(_int_list(json.loads(f"[{match.group(1)}]"), "README.md matryoshka_dims"))
        except (ValueError, json.JSONDecodeError):
            continue   # a card's prose is not ours to fail on: the tag alone still declares support
    return Matryoshka(tuple(sorted(dims, reverse=True)) or None, "README.md")


def check_dimensions(dimensions: int, full: int, matryoshka: Matryoshka | None, model: str) -> None:
    """ValueError saying why ``dimensions`` cannot be served for this model; None when it can."""
    if dimensions < 1:
        raise ValueError(f"dimensions must be at least 1, got {dimensions}")
    if matryoshka is None:
        raise ValueError(f"dimensions is not supported by {model}: its embeddings are not Matryoshka "
                         f"embeddings (no matryoshka_dimensions in config.json, no MatryoshkaLoss in "
                         f"its sentence-transformers model card), so truncating them would only degrade them")
    if dimensions > full:
        raise ValueError(f"dimensions must be at most {full}, the size of {model}'s embeddings, got {dimensions}")
    if matryoshka.dims is not None and dimensions not in matryoshka.dims and dimensions != full:
        raise ValueError(f"{model} was trained for dimensions {list(matryoshka.dims)} "
                         f"({matryoshka.source}), got {dimensions}")
