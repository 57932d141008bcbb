"""The engine's cache-free tasks: preprocess, forward, embed, classify (``Engine`` delegates here).

    forward(batch) on a causal LM     {"logits": next-token logits [B,V], "labels": top-5 next
                                       tokens per input (decoded strings), "probabilities": their
                                       probabilities [B,5]}
                   on a classifier    {"logits": [B,C], "labels": predicted label names,
                                       "probabilities": softmax [B,C]}
                   on an encoder      {"embeddings": [B,d]} pooled (and normalized) as the folder says
    embed(texts)   encoders: the folder's pooling (sentence-transformers modules.json, else mean);
                   decoders: the last token's final hidden state, L2-normalized (last-token pooling,
                   as decoder embedding models such as e5-mistral do)
    classify(texts, labels=None)
                   with a classification head: its labels (``labels`` restricts the choice to
                   those names, probabilities renormalized over them);
                   without: zero-shot, texts and label texts embedded, logits = ZERO_SHOT_SCALE *
                   cosine similarity, probabilities = softmax over the labels
Returned tensors are float32 on the CPU. Batches are split into forwards of at most
max_num_batched_tokens tokens (a longer single input runs alone). While generation requests are
in flight, the forwards are smaller, about INTERLEAVE_SECONDS each (timed on earlier forwards),
and the engine's lock is fair: the steps of running streams interleave with a long batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lepton.model_executor.pooling import Pooler

TOP_LABELS = 5
# Similarity scale of the zero-shot softmax: 20 is the scale sentence-transformers' contrastive
# loss trains embedding models with, so a cosine gap of 0.1 gives odds of e^2 ~ 7.4 : 1.
ZERO_SHOT_SCALE = 20.0
# While generation runs, a cache-free forward aims at this long: the steps of running streams
# wait for the model at most about this much per forward of an embedding batch.
INTERLEAVE_SECONDS = 0.02


@dataclass
class Batch:
    """Tokenized inputs: ``texts[b]`` is None for inputs given as token ids."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    texts: list[str | None]

    def __len__(self) -> int:
        return len(self.input_ids)


class TaskRunner:
    """Whole-sequence forwards through the executor, no KV cache. ``lock`` serializes them with
    the engine's steps (one forward at a time on the model); ``busy()`` says whether generation
    requests are in flight (then forwards are kept short)."""

    def __init__(self, executor, input_processor, tokenizer, pooler: Pooler | None,
                 max_num_batched_tokens: int, lock, busy=None):
        self.executor = executor
        self.model = executor.model
        self.input_processor = input_processor
        self.tokenizer = tokenizer
        self.pooler = pooler
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lock = lock
        self.busy = busy or (lambda: False)
        self._seconds_per_token: float | None = None   # of earlier forwards (a running average)

    def preprocess(self, inputs) -> Batch:
        """A text, a list of texts, a list of token ids, or a list of those -> Batch."""
        prompts = self.input_processor.prompts(inputs, what="inputs")
        for i, prompt in enumerate(prompts):
            self.input_processor.check_prompt(prompt.token_ids, f"input {i}", generation=False)
        types = [p.token_type_ids or [0] * len(p.token_ids) for p in prompts]
        has_types = getattr(self.model, "is_encoder", False)
        return Batch([p.token_ids for p in prompts], types if has_types else None, [p.text for p in prompts])

    def _budget(self) -> int:
        """Tokens of the next forward: max_num_batched_tokens, or while generation runs, what
        INTERLEAVE_SECONDS allows at the measured speed (one input until it is measured)."""
        if not self.busy():
            return self.max_num_batched_tokens
        rate = self._seconds_per_token
        if rate is None:
            return 1
        return max(1, min(self.max_num_batched_tokens, int(INTERLEAVE_SECONDS / max(rate, 1e-9))))

    def _encode_groups(self, batch: Batch):
        """(hidden[T,H], cu_seqlens[B'+1]) per group of inputs within the token budget; the lock
        is taken per group, so engine steps run in between."""
        start = 0
        while start < len(batch):
            budget, end, total = self._budget(), start, 0
            while end < len(batch) and (end == start or total + len(batch.input_ids[end]) <= budget):
                total += len(batch.input_ids[end])
                end += 1
            types = batch.token_type_ids[start:end] if batch.token_type_ids is not None else None
            with self.lock:
                began = time.perf_counter()
                encoded = self.executor.encode(batch.input_ids[start:end], types)
                rate = (time.perf_counter() - began) / max(total, 1)
            old = self._seconds_per_token
            self._seconds_per_token = rate if old is None else 0.5 * (old + rate)
            yield encoded
            start = end

    def _as_batch(self, inputs) -> Batch:
        return inputs if isinstance(inputs, Batch) else self.preprocess(inputs)

    @torch.inference_mode()
    def forward(self, batch) -> dict:
        """The model's outputs for a Batch (or anything preprocess takes); see the module doc."""
        batch = self._as_batch(batch)
        if hasattr(self.model, "classify"):
            logits = torch.cat([self.model.classify(h, cu).float().cpu() for h, cu in self._encode_groups(batch)])
            names = [self.model.id2label[int(i)] for i in logits.argmax(dim=-1)]
            return {"logits": logits, "labels": names, "probabilities": logits.softmax(dim=-1)}
        if getattr(self.model, "is_encoder", False):
            return {"embeddings": self._pooled(batch)}
        logits = torch.cat([self.model.compute_logits(h[cu[1:].long() - 1]).float().cpu()
                            for h, cu in self._encode_groups(batch)])
        probs, ids = logits.softmax(dim=-1).topk(min(TOP_LABELS, logits.shape[-1]), dim=-1)
        decode = (lambda t: str(t)) if self.tokenizer is None else (lambda t: self.tokenizer.decode([t]))
        labels = [[decode(t) for t in row] for row in ids.tolist()]
        return {"logits": logits, "labels": labels, "probabilities": probs}

    @torch.inference_mode()
    def _pooled(self, batch: Batch) -> torch.Tensor:
        pooler = self.pooler
        if pooler is None:
            raise ValueError("this model folder's sentence-transformers pipeline has no Pooling module, "
                             "so it defines no sentence embedding")
        return torch.cat([pooler(h, cu).float().cpu() for h, cu in self._encode_groups(batch)])

    def embed(self, texts) -> torch.Tensor:
        """Embeddings [B, d] (float32, CPU) of a text or a list of texts (or token-id lists)."""
        return self._pooled(self._as_batch(texts))

    def classify(self, texts, labels: list[str] | None = None) -> dict:
        """{"logits" [B,C], "labels" (predicted name per text), "probabilities" [B,C],
        "label_names" (the C names)}; see the module doc for heads vs zero-shot."""
        if labels is not None and (isinstance(labels, str) or not labels
                                   or not all(isinstance(x, str) and x for x in labels)):
            raise ValueError(f"labels must be a non-empty list of non-empty strings, got {labels!r}")
        if hasattr(self.model, "classify"):
            out = self.forward(texts)
            names = [self.model.id2label[i] for i in range(len(self.model.id2label))]
            if labels is not None:
                unknown = [x for x in labels if x not in names]
                if unknown:
                    raise ValueError(f"labels {unknown} are not among the model's labels {names}")
                out["logits"] = out["logits"][:, [names.index(x) for x in labels]]
                names = list(labels)
            logits = out["logits"]
        else:
            if labels is None:
                raise ValueError("this model has no classification head: pass labels=[...] for "
                                 "zero-shot classification by embedding similarity")
            text_emb = F.normalize(self.embed(texts), dim=-1)
            label_emb = F.normalize(self.embed(list(labels)), dim=-1)
            logits, names = ZERO_SHOT_SCALE * text_emb @ label_emb.T, list(labels)
        probs = logits.softmax(dim=-1)
        return {"logits": logits, "labels": [names[int(i)] for i in probs.argmax(dim=-1)],
                "probabilities": probs, "label_names": names}


def decoder_pooler() -> Pooler:
    """Last-token pooling, L2-normalized: the embedding of a decoder without a pooling config."""
    return Pooler(("lasttoken",), normalize=True)
