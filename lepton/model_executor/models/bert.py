"""BERT encoders (Devlin et al. 2018, arXiv:1810.04805): BertModel and BertForSequenceClassification.

Post-LN transformer over a flattened batch (no padding), bidirectional attention:
    x = LayerNorm(word[ids] + position[pos] + token_type[types])
    per layer:  x = LayerNorm(x + W_o attn(W_qkv x))
                x = LayerNorm(x + W_out act(W_in x))         (act: hidden_act, erf gelu for BERT)
Query, key and value projections are fused into one [3H, H] matrix at load time. The sequence
classifier reads the [CLS] token (first of each sequence): logits = W_c tanh(W_p h_cls + b_p) + b_c.

Checkpoint names are Hugging Face's, with or without the ``bert.`` prefix (sentence-transformers
folders store the bare encoder, BertForSequenceClassification checkpoints prefix it); the map
from those names to parameters is a models.weights.WeightMap, keyed by the bare names.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lepton.model_executor.layers.activation import activation
from lepton.model_executor.layers.attention import Attention, AttentionMetadata
from lepton.model_executor.layers.linear import Linear
from lepton.model_executor.layers.norm import LayerNorm
from lepton.model_executor.models.weights import MappedWeights, WeightMap, require_config

# Buffers some checkpoints carry that hold no weights.
_IGNORED = (r"(^|\.)embeddings\.position_ids$",)
# A classifier checkpoint's pooler, when its encoder is loaded as a plain BertModel.
_IGNORED_POOLER = (r"^(bert\.)?pooler\.dense\.(weight|bias)$",)
# Classifier checkpoints prefix the encoder with "bert."; TensorFlow conversions name LayerNorm
# parameters gamma / beta.
_RENAMES = ((r"^bert\.", ""), (r"LayerNorm\.gamma$", "LayerNorm.weight"),
            (r"LayerNorm\.beta$", "LayerNorm.bias"))
# HF sub-module (inside encoder.layer.i) -> lepton sub-module of BertLayer.
_LAYER_NAMES = {
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "out_norm",
}
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, act, dtype, device):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = Linear(hidden, [hidden, hidden, hidden], True, dtype, device)
        self.attn = Attention(heads, heads, self.head_dim, causal=False)
        self.attn_out = Linear(hidden, hidden, True, dtype, device)
        self.attn_norm = LayerNorm(hidden, eps, dtype=dtype, device=device)
        self.intermediate = Linear(hidden, intermediate, True, dtype, device)
        self.output = Linear(intermediate, hidden, True, dtype, device)
        self.out_norm = LayerNorm(hidden, eps, dtype=dtype, device=device)
        self.act = act

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, H]; q/k/v: [T, heads, head_dim]
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        attn = self.attn(q, k, v, meta).reshape(x.shape)
        # Post-LN: norm(sublayer, x) gives (LayerNorm(x + sublayer), x + sublayer); the normalized
        # sum is the next layer's input and residual, so the raw sum is dropped.
        x, _ = self.attn_norm(self.attn_out(attn), x)
        x, _ = self.out_norm(self.output(self.act(self.intermediate(x))), x)
        return x


class BertModel(MappedWeights, nn.Module):
    """Encoder returning the last hidden states [T, H] of a flattened batch."""

    is_encoder = True

    def __init__(self, config: dict, dtype: torch.dtype, device, with_pooler: bool = False):
        super().__init__()
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT position_embedding_type {config['position_embedding_type']!r} is not "
                             "supported (only 'absolute')")
        require_config(config, "BERT", "hidden_size", "num_attention_heads", "num_hidden_layers",
                       "intermediate_size", "vocab_size", "max_position_embeddings")
        try:
            act = activation(config.get("hidden_act", "gelu"))
        except ValueError as err:
            raise ValueError(f"BERT hidden_act: {err}") from None
        self.hidden_size = H = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        if H % heads:
            raise ValueError(f"hidden_size ({H}) must be a multiple of num_attention_heads ({heads})")
        self.max_position_embeddings = int(config["max_position_embeddings"])
        eps = float(config.get("layer_norm_eps", 1e-12))

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.word_embeddings = param(int(config["vocab_size"]), H)
        self.position_embeddings = param(self.max_position_embeddings, H)
        self.token_type_embeddings = param(int(config.get("type_vocab_size", 2)), H)
        self.embed_norm = LayerNorm(H, eps, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            BertLayer(H, heads, int(config["intermediate_size"]), eps, act, dtype, device)
            for _ in range(int(config["num_hidden_layers"])))
        self.pooler = Linear(H, H, True, dtype, device) if with_pooler else None
        self.weight_map = self._build_weight_map()

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype, device) -> "BertModel":
        return cls(config, dtype, device)

    def _build_weight_map(self) -> WeightMap:
        """Bare HF names (no ``bert.``) -> parameters; q/k/v fill row blocks of the fused qkv."""
        ignore = _IGNORED + (() if self.pooler is not None else _IGNORED_POOLER)
        wm = WeightMap(ignore=ignore, renames=_RENAMES)
        wm.add("embeddings.word_embeddings.weight", self.word_embeddings)
        wm.add("embeddings.position_embeddings.weight", self.position_embeddings)
        wm.add("embeddings.token_type_embeddings.weight", self.token_type_embeddings)
        modules = [("embeddings.LayerNorm", self.embed_norm)]
        for i, layer in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            for j, name in enumerate(_QKV):
                wm.add(f"{p}{name}.weight", layer.qkv.weight, layer.qkv.part_rows(j))
                wm.add(f"{p}{name}.bias", layer.qkv.bias, layer.qkv.part_rows(j))
            modules += [(p + hf, getattr(layer, name)) for hf, name in _LAYER_NAMES.items()]
        if self.pooler is not None:
            modules.append(("pooler.dense", self.pooler))
        for name, module in modules:
            wm.add(f"{name}.weight", module.weight)
            wm.add(f"{name}.bias", module.bias)
        return wm

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (hf_name, tensor) pairs into the parameters; returns the names loaded so far, bare
        (``bert.`` dropped, gamma/beta as weight/bias): the names :meth:`check_loaded` reports.

        Unknown names raise ValueError naming them. Call :meth:`check_loaded` after the last shard.
        """
        super().load_weights(weights)
        return set(self.weight_map.loaded)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/positions[T] int64 (token_type_ids[T] or None: all 0) -> hidden[T, H]."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids must be [T] and positions the same shape, got "
                             f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        x = self.word_embeddings[input_ids] + self.position_embeddings[positions]
        if token_type_ids is None:
            x = x + self.token_type_embeddings[0]
        else:
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(f"token_type_ids shape {tuple(token_type_ids.shape)} must equal "
                                 f"input_ids shape {tuple(input_ids.shape)}")
            x = x + self.token_type_embeddings[token_type_ids]
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, meta)
        return x


class BertForSequenceClassification(BertModel):
    """BERT + pooler (dense, tanh on [CLS]) + linear classifier over ``id2label``."""

    def __init__(self, config: dict, dtype: torch.dtype, device):
        super().__init__(config, dtype, device, with_pooler=True)
        id2label = config.get("id2label")
        if id2label:
            self.id2label = {int(i): str(label) for i, label in id2label.items()}
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))}
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(f"config.json id2label keys must be 0..{len(self.id2label) - 1}, "
                             f"got {sorted(self.id2label)}")
        self.classifier = Linear(self.hidden_size, len(self.id2label), True, dtype, device)
        self.weight_map.add("classifier.weight", self.classifier.weight)
        self.weight_map.add("classifier.bias", self.classifier.bias)

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype, device) -> "BertForSequenceClassification":
        return cls(config, dtype, device)

    def classify(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """hidden[T, H], cu_seqlens[B+1] -> logits[B, C] (float32) from each sequence's first token."""
        cls_hidden = hidden[cu_seqlens[:-1].long()]
        return self.classifier(torch.tanh(self.pooler(cls_hidden))).float()
