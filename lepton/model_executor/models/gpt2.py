"""GPT-2 (Radford et al. 2019): GPT2LMHeadModel.

Pre-LayerNorm decoder with learned absolute positions (wpe), a fused q|k|v projection (c_attn),
a plain MLP with gelu (tanh form, "gelu_new") and the LM head tied to the token embeddings.
HF stores GPT-2's projections as Conv1D, weight [in, out]: they are transposed on load.
Attention scale 1/sqrt(D) (scale_attn_weights), divided by layer index + 1 when
scale_attn_by_inverse_layer_idx.

Under tensor parallelism (parallel/layers.py) c_attn and c_fc are column-parallel (c_attn's one
q|k|v tensor is cut into this rank's heads of each part), both c_proj row-parallel, wte
vocab-parallel (embedding and tied head); wpe and the LayerNorms are replicated.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from lepton.model_executor.layers.activation import activation
from lepton.model_executor.layers.attention import Attention, AttentionMetadata
from lepton.model_executor.layers.norm import LayerNorm
from lepton.model_executor.models.weights import MappedWeights, WeightMap, map_linear, require_config
from lepton.model_executor.parallel.layers import (VocabParallel, column_parallel_linear, row_parallel_linear,
                                                   split_evenly)

# Causal-mask buffers that older GPT-2 checkpoints saved next to the weights.
_IGNORED = (r"(^|\.)attn\.(masked_)?bias$",)


class GPT2Attention(nn.Module):
    def __init__(self, config: dict, layer_idx: int, dtype, device):
        super().__init__()
        hidden, num_heads = config["n_embd"], config["n_head"]
        self.head_dim = hidden // num_heads
        start, self.num_heads = split_evenly(num_heads, "n_head")        # this rank's heads
        heads = (start * self.head_dim, self.num_heads * self.head_dim)
        self.c_attn = column_parallel_linear(hidden, [hidden, hidden, hidden], True, dtype, device, [heads] * 3)
        self.c_proj = row_parallel_linear(hidden, hidden, True, dtype, device, heads)
        scale = self.head_dim ** -0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale=scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = (part.reshape(t, self.num_heads, self.head_dim)       # [T, H, D] each
                   for part in self.c_attn(x).split(self.c_attn.output_sizes, dim=-1))
        return self.c_proj(self.attn(q, k, v, meta).reshape(t, -1))


class GPT2Block(nn.Module):
    def __init__(self, config: dict, layer_idx: int, dtype, device):
        super().__init__()
        hidden, eps = config["n_embd"], config.get("layer_norm_epsilon", 1e-5)
        inner = config.get("n_inner") or 4 * hidden
        self.ln_1 = LayerNorm(hidden, eps, dtype=dtype, device=device)
        self.attn = GPT2Attention(config, layer_idx, dtype, device)
        self.ln_2 = LayerNorm(hidden, eps, dtype=dtype, device=device)
        self.c_fc = column_parallel_linear(hidden, inner, True, dtype, device)
        self.c_proj = row_parallel_linear(inner, hidden, True, dtype, device)
        self.act = activation(config.get("activation_function", "gelu_new"))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.ln_1(x), x
        else:
            x, residual = self.ln_1(x, residual)
        x, residual = self.ln_2(self.attn(x, meta), residual)
        return self.c_proj(self.act(self.c_fc(x))), residual


class GPT2LMHeadModel(MappedWeights, nn.Module):
    supports_tensor_parallel = True   # its layers shard (parallel/layers.py)

    def __init__(self, config: dict, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        require_config(config, "GPT-2", "n_embd", "n_layer", "n_head", "vocab_size")
        self.config = config
        hidden = config["n_embd"]
        self.vocab_size = config["vocab_size"]
        self.num_layers = config["n_layer"]
        self.max_position_embeddings = config.get("n_positions") or config.get("max_position_embeddings") or 1024
        self.sliding_window = None

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.vocab = VocabParallel(self.vocab_size)
        self.wte = self.vocab.parameter(hidden, dtype, device)            # [V / ranks, H]
        self.wpe = param(self.max_position_embeddings, hidden)
        self.h = nn.ModuleList(GPT2Block(config, i, dtype, device) for i in range(self.num_layers))
        self.ln_f = LayerNorm(hidden, config.get("layer_norm_epsilon", 1e-5), dtype=dtype, device=device)
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", True))
        self.lm_head_packed = None   # set by layers.linear.prepack_model on CPU
        self.lm_head = self.wte if self.tie_word_embeddings else self.vocab.parameter(hidden, dtype, device)
        self.num_kv_heads, self.head_dim = self.h[0].attn.num_heads, self.h[0].attn.head_dim
        self.weight_map = self._build_weight_map()

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype, device) -> "GPT2LMHeadModel":
        return cls(config, dtype, device)

    def _build_weight_map(self) -> WeightMap:
        wm = WeightMap(prefixes=("transformer.",), ignore=_IGNORED)
        vocab_rows, vocab_shard = self.vocab.local_rows(), self.vocab.shard()
        wm.add("transformer.wte.weight", self.wte, vocab_rows, shard=vocab_shard)
        wm.add("transformer.wpe.weight", self.wpe)
        wm.add("lm_head.weight", self.lm_head, vocab_rows, optional=self.tie_word_embeddings, shard=vocab_shard)
        norms = [("transformer.ln_f", self.ln_f)]
        for i, block in enumerate(self.h):
            p = f"transformer.h.{i}."
            norms += [(p + "ln_1", block.ln_1), (p + "ln_2", block.ln_2)]
            for name, linear in (("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                                 ("mlp.c_fc", block.c_fc), ("mlp.c_proj", block.c_proj)):
                map_linear(wm, p + name, linear, transpose=True, bias=True)
        for name, norm in norms:
            wm.add(f"{name}.weight", norm.weight)
            wm.add(f"{name}.bias", norm.bias)
        return wm

    def attention_layers(self) -> list[Attention]:
        return [block.attn.attn for block in self.h]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.vocab.embed(input_ids, self.wte) + F.embedding(positions, self.wpe), None   # [T, H]
        for block in self.h:
            x, residual = block(x, residual, meta)
        x, _ = self.ln_f(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32 (tensor parallel: on rank 0; the others get their shard)."""
        if self.lm_head_packed is not None:                                 # CPU, see layers/linear.py
            return self.vocab.gather(self.lm_head_packed(hidden).float())
        return self.vocab.gather(F.linear(hidden, self.lm_head).float())   # [N, V]
