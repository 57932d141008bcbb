"""Llama-family decoders: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

One pre-norm transformer; the differences are read from config.json:
    Llama    attention_bias (q/k/v/o), mlp_bias, rope_scaling (linear, dynamic, llama3, yarn)
    Mistral  sliding_window on every layer
    Qwen2    bias on q/k/v (never on o); sliding window on layers >= max_window_layers when
             use_sliding_window (or per layer from layer_types)
    Qwen3    RMSNorm over each head of q and k (q_norm, k_norm) before RoPE
Every model: head_dim (default hidden_size / heads), GQA, tied or untied embeddings.

Token batches are flattened: input_ids[T], positions[T], one AttentionMetadata for all layers.
q/k/v and gate/up are fused projections, filled from the separate HF tensors.

Under tensor parallelism (parallel/layers.py) qkv and gate_up are column-parallel (this rank's
heads, this rank's slice of the intermediate size), o_proj and down_proj row-parallel (one
all-reduce each per layer), the embedding and LM head vocab-parallel; norms and RoPE replicated.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from lepton.model_executor.layers.activation import gated_activation
from lepton.model_executor.layers.attention import Attention, AttentionMetadata
from lepton.model_executor.layers.norm import RMSNorm
from lepton.model_executor.layers.rotary import RotaryEmbedding, rope_max_positions, rope_parameters
from lepton.model_executor.models.weights import MappedWeights, WeightMap, map_linear, require_config
from lepton.model_executor.parallel.layers import (VocabParallel, column_parallel_linear, kv_head_shard,
                                                   row_parallel_linear, split_evenly)

_IGNORED = (r"rotary_emb\.inv_freq$",)


def _layer_windows(config: dict) -> list[int | None]:
    """Sliding window of each layer (None: full attention), as transformers decides it."""
    n, window = config["num_hidden_layers"], config.get("sliding_window")
    if config.get("layer_types"):
        return [window if t == "sliding_attention" else None for t in config["layer_types"]]
    if config.get("model_type") in ("qwen2", "qwen3") or "use_sliding_window" in config:
        if not config.get("use_sliding_window", False):
            return [None] * n
        first = config.get("max_window_layers", n)
        return [window if i >= first else None for i in range(n)]
    return [window] * n


class LlamaAttention(nn.Module):
    def __init__(self, config: dict, rotary_emb: RotaryEmbedding, sliding_window: int | None, dtype, device):
        super().__init__()
        hidden, num_heads = config["hidden_size"], config["num_attention_heads"]
        num_kv_heads = config.get("num_key_value_heads") or num_heads
        self.head_dim = d = config.get("head_dim") or hidden // num_heads
        qwen2 = config.get("model_type") == "qwen2"
        self.qkv_bias = True if qwen2 else bool(config.get("attention_bias", False))
        self.o_bias = False if qwen2 else bool(config.get("attention_bias", False))
        # This rank's heads (all of them without tensor parallelism).
        q_start, self.num_heads = split_evenly(num_heads, "num_attention_heads")
        kv_start, self.num_kv_heads = kv_head_shard(num_heads, num_kv_heads)
        q_range, kv_range = (q_start * d, self.num_heads * d), (kv_start * d, self.num_kv_heads * d)
        q_size, kv_size = num_heads * d, num_kv_heads * d
        self.qkv_proj = column_parallel_linear(hidden, [q_size, kv_size, kv_size], self.qkv_bias, dtype, device,
                                               [q_range, kv_range, kv_range])
        self.o_proj = row_parallel_linear(q_size, hidden, self.o_bias, dtype, device, q_range)
        self.qk_norm = config.get("model_type") == "qwen3"
        if self.qk_norm:
            eps = config.get("rms_norm_eps", 1e-6)
            self.q_norm = RMSNorm(self.head_dim, eps, dtype, device)
            self.k_norm = RMSNorm(self.head_dim, eps, dtype, device)
        self.rotary_emb = rotary_emb      # one table shared by all layers
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)          # [T, Hq, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)       # [T, Hk, D]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, meta)                           # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: dict, dtype, device):
        super().__init__()
        hidden, inter, self.bias = config["hidden_size"], config["intermediate_size"], bool(config.get("mlp_bias"))
        self.gate_up_proj = column_parallel_linear(hidden, [inter, inter], self.bias, dtype, device)
        self.down_proj = row_parallel_linear(inter, hidden, self.bias, dtype, device)
        self.act = gated_activation(config.get("hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: dict, rotary_emb: RotaryEmbedding, sliding_window: int | None, dtype, device):
        super().__init__()
        eps = config.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(config, rotary_emb, sliding_window, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device)
        self.input_layernorm = RMSNorm(config["hidden_size"], eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], eps, dtype, device)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(MappedWeights, nn.Module):
    supports_tensor_parallel = True   # its layers shard (parallel/layers.py)

    def __init__(self, config: dict, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        require_config(config, "Llama-family model", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "vocab_size", "max_position_embeddings")
        self.config = config
        hidden = config["hidden_size"]
        self.vocab_size = config["vocab_size"]
        self.num_layers = config["num_hidden_layers"]
        rope = rope_parameters(config)
        # Scaled RoPE (yarn, linear, dynamic) serves longer sequences than the checkpoint states.
        self.max_position_embeddings = rope_max_positions(config["max_position_embeddings"], rope)
        windows = _layer_windows(config)
        # The cache can only be trimmed to a window when every layer slides.
        self.sliding_window = windows[0] if windows and None not in windows and len(set(windows)) == 1 else None
        self.vocab = VocabParallel(self.vocab_size)
        self.embed_tokens = self.vocab.parameter(hidden, dtype, device)       # [V / ranks, H]
        head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
        self.rotary_emb = RotaryEmbedding(head_dim, config["max_position_embeddings"], rope, True, dtype, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.rotary_emb, w, dtype, device) for w in windows)
        self.norm = RMSNorm(hidden, config.get("rms_norm_eps", 1e-6), dtype, device)
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        self.lm_head_packed = None   # set by layers.linear.prepack_model on CPU
        self.lm_head = (self.embed_tokens if self.tie_word_embeddings
                        else self.vocab.parameter(hidden, dtype, device))
        attn = self.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.weight_map = self._build_weight_map()

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype, device) -> "LlamaForCausalLM":
        return cls(config, dtype, device)

    def _build_weight_map(self) -> WeightMap:
        wm = WeightMap(prefixes=("model.",), ignore=_IGNORED)
        vocab_rows, vocab_shard = self.vocab.local_rows(), self.vocab.shard()
        wm.add("model.embed_tokens.weight", self.embed_tokens, vocab_rows, shard=vocab_shard)
        wm.add("model.norm.weight", self.norm.weight)
        wm.add("lm_head.weight", self.lm_head, vocab_rows, optional=self.tie_word_embeddings, shard=vocab_shard)
        for i, layer in enumerate(self.layers):
            p, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                map_linear(wm, f"{p}self_attn.{name}", attn.qkv_proj, j, bias=attn.qkv_bias)
            for j, name in enumerate(("gate_proj", "up_proj")):
                map_linear(wm, f"{p}mlp.{name}", mlp.gate_up_proj, j, bias=mlp.bias)
            map_linear(wm, f"{p}self_attn.o_proj", attn.o_proj, bias=attn.o_bias)
            map_linear(wm, f"{p}mlp.down_proj", mlp.down_proj, bias=mlp.bias)
            wm.add(f"{p}input_layernorm.weight", layer.input_layernorm.weight)
            wm.add(f"{p}post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
            if attn.qk_norm:
                wm.add(f"{p}self_attn.q_norm.weight", attn.q_norm.weight)
                wm.add(f"{p}self_attn.k_norm.weight", attn.k_norm.weight)
        return wm

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.vocab.embed(input_ids, self.embed_tokens), None     # [T, H]
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] float32 (tensor parallel: on rank 0; the others get their shard)."""
        if self.lm_head_packed is not None:                                 # CPU, see layers/linear.py
            return self.vocab.gather(self.lm_head_packed(hidden).float())
        return self.vocab.gather(F.linear(hidden, self.lm_head).float())   # [N, V]
