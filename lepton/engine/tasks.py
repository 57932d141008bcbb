"""The engine's cache-free tasks: preprocess, forward, embed, classify (mixed into Engine).

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
max_num_batched_tokens tokens (a longer single input runs alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lepton.model_executor.pooling import Pooler
from lepton.tokenizer import encode

TOP_LABELS = 5
# Similarity scale of the zero-shot softmax: 20 is the scale sentence-transformers' contrastive
# loss trains embedding models with, so a cosine gap of 0.1 gives odds of e^2 ~ 7.4 : 1.
ZERO_SHOT_SCALE = 20.0


@dataclass
class Batch:
    """Tokenized inputs: ``texts[b]`` is None for inputs given as token ids."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    texts: list[str | None]

    def __len__(self) -> int:
        return len(self.input_ids)


def _is_token_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


class TasksMixin:
    """Needs from the engine: tokenizer, runner, model, pooler, max_model_len, vocab_size,
    config.max_num_batched_tokens and check_prompt()."""

    def preprocess(self, inputs) -> Batch:
        """A text, a list of texts, a list of token ids, or a list of those -> Batch."""
        if isinstance(inputs, str) or _is_token_ids(inputs):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise ValueError("inputs must be a non-empty string, list of strings or list of token-id lists")
        ids, types, texts = [], [], []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise ValueError("this model folder has no tokenizer: pass token ids instead of text")
                tokens, token_types = encode(self.tokenizer, item)
                texts.append(item)
            elif isinstance(item, (list, tuple)):
                tokens, token_types = list(item), None
                texts.append(None)
            else:
                raise ValueError(f"input {i} must be a string or a list of token ids, got {type(item).__name__}")
            self.check_prompt(tokens, i, generation=False)
            ids.append(tokens)
            types.append(token_types or [0] * len(tokens))
        has_types = getattr(self.model, "is_encoder", False)
        return Batch(ids, types if has_types else None, texts)

    def _encode_groups(self, batch: Batch):
        """(hidden[T,H], cu_seqlens[B'+1]) per group of inputs within the token budget."""
        budget, start = self.config.max_num_batched_tokens, 0
        while start < len(batch):
            end, total = start, 0
            while end < len(batch) and (end == start or total + len(batch.input_ids[end]) <= budget):
                total += len(batch.input_ids[end])
                end += 1
            types = batch.token_type_ids[start:end] if batch.token_type_ids is not None else None
            yield self.runner.encode(batch.input_ids[start:end], types)
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
        labels = [[self._decode_token(t) for t in row] for row in ids.tolist()]
        return {"logits": logits, "labels": labels, "probabilities": probs}

    def _decode_token(self, token_id: int) -> str:
        return str(token_id) if self.tokenizer is None else self.tokenizer.decode([token_id])

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
