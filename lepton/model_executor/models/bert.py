"""BERT encoders (Devlin et al. 2018, arXiv:1810.04805): BertModel and BertForSequenceClassification.

Post-LN transformer over a flattened batch (no padding), bidirectional attention:
    x = LayerNorm(word[ids] + position[pos] + token_type[types])
    per layer:  x = LayerNorm(x + W_o attn(W_qkv x))
                x = LayerNorm(x + W_out act(W_in x))         (act: hidden_act, erf gelu for BERT)
Query, key and value projections are fused into one [3H, H] matrix at load time. The sequence
classifier reads the [CLS] token (first of each sequence): logits = W_c tanh(W_p h_cls + b_p) + b_c.

Checkpoint names are Hugging Face's, with or without the ``bert.`` prefix (sentence-transformers
folders store the bare encoder, BertForSequenceClassification checkpoints prefix it).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

import lepton_kernels as lk
from lepton.model_executor.layers.attention import Attention, AttentionMetadata
from lepton.model_executor.layers.linear import Linear

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
# Buffers some checkpoints carry that hold no weights.
_IGNORED = re.compile(r"(.*\.)?embeddings\.position_ids$")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)$")
# HF sub-module (inside encoder.layer.i) -> lepton sub-module of BertLayer.
_LAYER_NAMES = {
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "out_norm",
}
_QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}


def _config_value(config: dict, key: str, default=None):
    value = config.get(key, default)
    if value is None:
        raise ValueError(f"BERT config.json lacks {key!r}")
    return value


def Dense(in_features: int, out_features: int, dtype, device, bias: bool = True) -> Linear:
    """y = x W^T + b: lepton's Linear, so CPU float32 engines prepack it for oneDNN like the
    decoders' matmuls. Parameters are left uninitialized: the checkpoint fills them."""
    return Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)


class LayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return lk.layer_norm(x, self.weight, self.bias, self.eps)
        return lk.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)[0]


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, act, dtype, device):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = Dense(hidden, 3 * hidden, dtype, device)
        self.attn = Attention(heads, heads, self.head_dim, causal=False)
        self.attn_out = Dense(hidden, hidden, dtype, device)
        self.attn_norm = LayerNorm(hidden, eps, dtype, device)
        self.intermediate = Dense(hidden, intermediate, dtype, device)
        self.output = Dense(intermediate, hidden, dtype, device)
        self.out_norm = LayerNorm(hidden, eps, dtype, device)
        self.act = act

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, H]; q/k/v: [T, heads, head_dim]
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        attn = self.attn(q, k, v, meta).reshape(x.shape)
        x = self.attn_norm(self.attn_out(attn), residual=x)
        return self.out_norm(self.output(self.act(self.intermediate(x))), residual=x)


class BertModel(nn.Module):
    """Encoder returning the last hidden states [T, H] of a flattened batch."""

    is_encoder = True

    def __init__(self, config: dict, dtype: torch.dtype, device, with_pooler: bool = False):
        super().__init__()
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT position_embedding_type {config['position_embedding_type']!r} is not "
                             "supported (only 'absolute')")
        act = _config_value(config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"BERT hidden_act {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
        self.hidden_size = H = int(_config_value(config, "hidden_size"))
        heads = int(_config_value(config, "num_attention_heads"))
        if H % heads:
            raise ValueError(f"hidden_size ({H}) must be a multiple of num_attention_heads ({heads})")
        self.max_position_embeddings = int(_config_value(config, "max_position_embeddings"))
        eps = float(_config_value(config, "layer_norm_eps", 1e-12))
        self.word_embeddings = nn.Parameter(
            torch.empty(int(_config_value(config, "vocab_size")), H, dtype=dtype, device=device), requires_grad=False)
        self.position_embeddings = nn.Parameter(
            torch.empty(self.max_position_embeddings, H, dtype=dtype, device=device), requires_grad=False)
        self.token_type_embeddings = nn.Parameter(
            torch.empty(int(config.get("type_vocab_size", 2)), H, dtype=dtype, device=device), requires_grad=False)
        self.embed_norm = LayerNorm(H, eps, dtype, device)
        self.layers = nn.ModuleList(
            BertLayer(H, heads, int(_config_value(config, "intermediate_size")), eps, _ACTIVATIONS[act], dtype, device)
            for _ in range(int(_config_value(config, "num_hidden_layers"))))
        self.pooler = Dense(H, H, dtype, device) if with_pooler else None
        self._targets = self._weight_targets()
        self._loaded: set[str] = set()

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype, device) -> "BertModel":
        return cls(config, dtype, device)

    def _weight_targets(self) -> dict[str, tuple[torch.Tensor, int | None]]:
        """HF name (without ``bert.``) -> (parameter, row block of the fused qkv or None)."""
        targets = {
            "embeddings.word_embeddings.weight": (self.word_embeddings, None),
            "embeddings.position_embeddings.weight": (self.position_embeddings, None),
            "embeddings.token_type_embeddings.weight": (self.token_type_embeddings, None),
            "embeddings.LayerNorm.weight": (self.embed_norm.weight, None),
            "embeddings.LayerNorm.bias": (self.embed_norm.bias, None),
        }
        for i, layer in enumerate(self.layers):
            for hf, part in _QKV.items():
                for kind in ("weight", "bias"):
                    targets[f"encoder.layer.{i}.{hf}.{kind}"] = (getattr(layer.qkv, kind), part)
            for hf, name in _LAYER_NAMES.items():
                for kind in ("weight", "bias"):
                    targets[f"encoder.layer.{i}.{hf}.{kind}"] = (getattr(getattr(layer, name), kind), None)
        if self.pooler is not None:
            targets["pooler.dense.weight"] = (self.pooler.weight, None)
            targets["pooler.dense.bias"] = (self.pooler.bias, None)
        return targets

    @staticmethod
    def _canonical(name: str) -> str:
        name = name.removeprefix("bert.")
        # Checkpoints converted from TensorFlow name LayerNorm parameters gamma / beta.
        return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))

    def _load_one(self, name: str, tensor: torch.Tensor) -> bool:
        """Copy one checkpoint tensor into place; False for a name this model does not know."""
        key = self._canonical(name)
        if _IGNORED.match(key) or (self.pooler is None and key.startswith("pooler.dense.")):
            return True
        if key not in self._targets:
            return False
        param, part = self._targets[key]
        dest = param if part is None else param.chunk(3, dim=0)[part]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dest.shape)} from config.json")
        with torch.no_grad():
            dest.copy_(tensor)
        self._loaded.add(key)
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (hf_name, tensor) pairs into the parameters; returns the HF names loaded so far.

        Unknown names raise ValueError naming them. Call :meth:`check_loaded` after the last shard.
        """
        unexpected = [name for name, tensor in weights if not self._load_one(name, tensor)]
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
            raise ValueError(f"{type(self).__name__}: unexpected checkpoint tensors: {shown}")
        return set(self._loaded)

    def check_loaded(self) -> None:
        missing = [name for name in self._targets if name not in self._loaded]
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise ValueError(f"{type(self).__name__}: checkpoint lacks tensors: {shown}")

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
        self.classifier = Dense(self.hidden_size, len(self.id2label), dtype, device)
        self._targets["classifier.weight"] = (self.classifier.weight, None)
        self._targets["classifier.bias"] = (self.classifier.bias, None)

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype, device) -> "BertForSequenceClassification":
        return cls(config, dtype, device)

    def classify(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """hidden[T, H], cu_seqlens[B+1] -> logits[B, C] (float32) from each sequence's first token."""
        cls_hidden = hidden[cu_seqlens[:-1].long()]
        return self.classifier(torch.tanh(self.pooler(cls_hidden))).float()
