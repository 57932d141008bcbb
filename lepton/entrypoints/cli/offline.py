"""``lepton generate``, ``lepton embed`` and ``lepton classify``: batch work on a local model.

    lepton generate --model PATH "prompt" ... [--file prompts.txt|.jsonl] [--output out.jsonl]
    lepton embed --model PATH "text" ... [--file texts.txt] [--output out.jsonl]
    lepton classify --model PATH "text" ... [--labels a,b,c] [--output out.jsonl]

Without --output the results are printed for reading; with it (``-`` = stdout) every input gets
one JSON line, in input order.
"""

from __future__ import annotations

import argparse

from lepton.entrypoints.cli.io import (CLIError, add_engine_arguments, add_sampling_arguments, gather_inputs,
                                       load_engine, output_file, positive_int, sampling_params, write_jsonl)

_TEXT_KEYS = ("text", "prompt")


def _add_inputs(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(what, nargs="*", help=f"{what} to process (or use --file)")
    parser.add_argument("--model", required=True, help="model folder or hub id")
    parser.add_argument("--file", default=None,
                        help=f"{what}, one per line; a .jsonl file holds {{\"prompt\": ...}} objects "
                             "(a string or a list of token ids)")
    parser.add_argument("--output", "-o", default=None, help="write JSON lines here ('-' = stdout)")


def add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="complete prompts with a causal LM",
                         description="Complete prompts with a causal LM (continuous batching, "
                                     "progress bar on stderr).")
    _add_inputs(gen, "prompts")
    gen.add_argument("--n", type=positive_int, default=1, help="completions per prompt")
    gen.add_argument("--logprobs", type=int, default=None,
                     help="also return the top-N logprobs of every generated token")
    add_sampling_arguments(gen, max_tokens=64)
    add_engine_arguments(gen)
    gen.set_defaults(func=run_generate)


def add_pooling_parsers(sub) -> None:

    emb = sub.add_parser("embed", help="embed texts (sentence embeddings)")
    _add_inputs(emb, "texts")
    add_engine_arguments(emb)
    emb.set_defaults(func=run_embed)

    cls = sub.add_parser("classify", help="classify texts (the model's head, or zero-shot labels)")
    _add_inputs(cls, "texts")
    cls.add_argument("--labels", default=None,
                     help="comma-separated label names: zero-shot labels for an embedding model, "
                          "or a subset of a classifier's labels")
    add_engine_arguments(cls)
    cls.set_defaults(func=run_classify)


# ---- generate -----------------------------------------------------------------------------------
def completion_row(completion, with_logprobs: bool) -> dict:
    row = {"text": completion.text, "token_ids": list(completion.token_ids),
           "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
    if with_logprobs:
        row["cumulative_logprob"] = completion.cumulative_logprob
        row["logprobs"] = [{str(token): {"logprob": lp.logprob, "rank": lp.rank,
                                         "decoded_token": lp.decoded_token}
                            for token, lp in step.items()} for step in completion.logprobs or []]
    return row


def generation_row(prompt, result, with_logprobs: bool) -> dict:
    """{"prompt", "prompt_token_ids", then the completion's fields (n = 1) or "outputs" (n > 1)}."""
    row = {"prompt": prompt, "prompt_token_ids": list(result.prompt_token_ids)}
    completions = [completion_row(c, with_logprobs) for c in result.outputs]
    if len(completions) == 1:
        row.update(completions[0])
    else:
        row["outputs"] = [dict(index=c.index, **r) for c, r in zip(result.outputs, completions)]
    return row


def run_generate(args: argparse.Namespace) -> int:
    prompts = gather_inputs(args.prompts, args.file, "prompts", ("prompt",))
    params = sampling_params(args, n=args.n, logprobs=args.logprobs)   # checked before loading
    with output_file(args.output) as out:
        engine = load_engine(args)
        results = engine.generate(prompts, params, use_tqdm=True)
        for prompt, result in zip(prompts, results):
            if out is not None:
                write_jsonl(out, generation_row(prompt, result, args.logprobs is not None))
                continue
            shown = prompt if isinstance(prompt, str) else f"{prompt} -> "
            for completion in result.outputs:
                print(f"{shown}{completion.text}")
                print(f"  [{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]")
    return 0


# ---- embed and classify -------------------------------------------------------------------------
def _shown(text) -> str:
    return text if isinstance(text, str) else str(text)


def run_embed(args: argparse.Namespace) -> int:
    texts = gather_inputs(args.texts, args.file, "texts", _TEXT_KEYS)
    with output_file(args.output) as out:
        embeddings = load_engine(args).embed(texts)
        for text, vector in zip(texts, embeddings):
            values = vector.tolist()
            if out is not None:
                write_jsonl(out, {"text": text, "embedding": values})
                continue
            head = ", ".join(f"{v:.4f}" for v in values[:4])
            print(f"{_shown(text)}\n  [{head}, ...] dim {len(values)}, norm {vector.norm():.4f}")
    return 0


def _parse_labels(text: str | None) -> list[str] | None:
    if text is None:
        return None
    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise CLIError(f"--labels must be comma-separated non-empty names, got {text!r}")
    if len(set(labels)) != len(labels):
        raise CLIError(f"--labels names a label twice: {text!r}")
    return labels


def run_classify(args: argparse.Namespace) -> int:
    texts = gather_inputs(args.texts, args.file, "texts", _TEXT_KEYS)
    labels = _parse_labels(args.labels)
    with output_file(args.output) as out:
        engine = load_engine(args)
        if labels is None and not hasattr(engine.model, "classify"):
            raise CLIError("this model has no classification head: pass --labels a,b,c for zero-shot "
                           "classification by embedding similarity")
        result = engine.classify(texts, labels=labels)
        names = result["label_names"]
        if out is None:
            width = max(len(_shown(t)) for t in texts)
            print(f"{'':<{width}}  {'label':<12}  " + "  ".join(f"{n:>10}" for n in names))
        for text, label, probs in zip(texts, result["labels"], result["probabilities"].tolist()):
            if out is not None:
                write_jsonl(out, {"text": text, "label": label,
                                  "probabilities": dict(zip(names, probs))})
                continue
            print(f"{_shown(text):<{width}}  {label:<12}  " + "  ".join(f"{p:>10.4f}" for p in probs))
    return 0
