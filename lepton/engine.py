"""``Engine``: load a checkpoint and serve it (generate, chat, forward, embed, classify).

    engine = Engine("path/or/hub-id")
    outs = engine.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text

Every argument is checked before anything loads (ValueError naming it). Generation runs a fixed
set of prompts to completion (generation.py); the cache-free tasks live in tasks.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading

import torch

from . import engine_setup as setup
from .config import EngineConfig
from .generation import BatchGenerator
from .kv_cache import BlockAllocator
from .layers.linear import prepack_model
from .loader import load_model, read_config, resolve_model_path
from .model_runner import ModelRunner
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling import SamplingParams
from .sequence import Sequence
from .tasks import TasksMixin
from .tokenizer import apply_chat_template, encode, load_tokenizer

logger = logging.getLogger(__name__)


class Engine(TasksMixin):
    """An inference engine for one Hugging Face checkpoint (see DESIGN.md for every argument).

    ``model``: a local folder or a hub id; None loads the default embedding model
    (all-MiniLM-L6-v2, from the ``lepton[demo]`` extra). ``enable_prefix_caching`` is accepted
    for the block manager that comes with the scheduler; this engine does not share prefixes yet.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, dtype="auto", device="auto",
                 max_model_len: int | None = None, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                 kernels: dict[str, str] | None = None, seed: int = 0, quantization: str | None = None,
                 tensor_parallel_size: int = 1):
        self.config = cfg = EngineConfig(
            dtype=dtype, device=device, max_model_len=max_model_len, block_size=block_size,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_memory=kv_cache_memory, gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching, kernels=kernels, seed=seed,
            quantization=quantization, tensor_parallel_size=tensor_parallel_size)
        self.model_path = resolve_model_path(setup.default_model() if model is None else model)
        self.hf_config = read_config(self.model_path)
        self.device = cfg.device
        self.dtype = setup.resolve_model_dtype(cfg, self.hf_config)
        self.model = load_model(self.model_path, self.hf_config, self.dtype, self.device)
        if cfg.quantization is not None:
            setup.quantize_model(self.model, cfg.quantization)
        if self.device.type == "cpu" and self.dtype == torch.float32:
            prepack_model(self.model)   # oneDNN weight layouts for the CPU matmuls
        self.tokenizer = load_tokenizer(self.model_path)
        self.vocab_size = int(getattr(self.model, "vocab_size", None) or self.hf_config["vocab_size"])
        self.max_model_len = setup.resolve_max_model_len(cfg, self.hf_config, self.model, self.model_path)
        self.is_generative = hasattr(self.model, "compute_logits") and hasattr(self.model, "attention_layers")
        self.pooler = setup.make_pooler(self.model, self.model_path)
        self.runner = ModelRunner(self.model, self.device, cfg.kernels)
        self.allocator: BlockAllocator | None = None
        if self.is_generative:
            self._init_kv_cache()
        self.eos_token_ids = setup.eos_token_ids(self.model_path, self.hf_config, self.tokenizer)
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self._request_counter = itertools.count()
        # One batch owns the KV cache at a time: concurrent generate() calls from several threads
        # queue here (continuous batching of independent callers comes with the scheduler).
        self._generate_lock = threading.Lock()

    def _init_kv_cache(self) -> None:
        num_blocks, self.max_model_len = setup.plan_kv_cache(self.config, self.runner, self.model,
                                                             self.dtype, self.max_model_len)
        self.runner.allocate_kv_cache(num_blocks, self.config.block_size, self.dtype)
        self.allocator = BlockAllocator(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens, max_model_len %d", num_blocks,
                    self.config.block_size, self.max_model_len)

    # ---- input checks ---------------------------------------------------------------------
    def check_prompt(self, token_ids: list[int], index: int, generation: bool) -> None:
        """ValueError for an empty prompt, out-of-vocabulary ids, or one too long to process."""
        if not token_ids:
            raise ValueError(f"prompt {index} is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ValueError(f"prompt {index}: token ids must be integers")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {index}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        limit = self.max_model_len - 1 if generation else self.max_model_len
        if len(token_ids) > limit:
            room = " and leave room for one generated token" if generation else ""
            raise ValueError(f"prompt {index} has {len(token_ids)} tokens; it must fit max_model_len "
                             f"({self.max_model_len}){room}")

    def _require_generative(self, what: str) -> None:
        if not self.is_generative:
            raise ValueError(f"{what} needs a causal language model; {self.hf_config['architectures'][0]} "
                             "is not one (use embed / classify / forward)")

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); one RequestOutput per prompt."""
        self._require_generative("generate")
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty string, token-id list, or list of those")
        texts, ids = [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("this model folder has no tokenizer: pass prompts as token ids")
                texts.append(prompt)
                ids.append(encode(self.tokenizer, prompt)[0])
            elif isinstance(prompt, (list, tuple)):
                texts.append(None)
                ids.append(list(prompt))
            else:
                raise ValueError(f"prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}")
        return self._generate(texts, ids, sampling_params)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to a conversation [{"role", "content"}, ...] or a list of conversations,
        formatted by the tokenizer's chat template (or ``chat_template``)."""
        self._require_generative("chat")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a conversation (list of dicts) or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        ids = [apply_chat_template(self.tokenizer, list(c), chat_template, add_generation_prompt)
               for c in conversations]
        texts = [self.tokenizer.decode(t) for t in ids]
        return self._generate(texts, ids, sampling_params)

    def _generate(self, texts: list[str | None], ids: list[list[int]], sampling_params) -> list[RequestOutput]:
        params = self._params_per_prompt(sampling_params, len(ids))
        for i, (tokens, p) in enumerate(zip(ids, params)):
            self.check_prompt(tokens, i, generation=True)
            if p.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        seqs = [Sequence(seq_id=len(ids) * k + i, request_index=i, sample_index=k, token_ids=list(tokens),
                         params=p, generator=self._generator(p, k))
                for i, (tokens, p) in enumerate(zip(ids, params)) for k in range(p.n)]
        detok = None if self.tokenizer is None else (
            lambda t, skip: self.tokenizer.decode(t, skip_special_tokens=skip))
        with self._generate_lock:
            BatchGenerator(self.runner, self.allocator, max_num_seqs=self.config.max_num_seqs,
                           max_num_batched_tokens=self.config.max_num_batched_tokens,
                           max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
                           detokenize=detok).run(seqs)
        outputs = [RequestOutput(str(next(self._request_counter)), texts[i], ids[i]) for i in range(len(ids))]
        for seq in seqs:
            outputs[seq.request_index].outputs.append(self._completion(seq))
        return outputs

    @staticmethod
    def _params_per_prompt(sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if isinstance(sampling_params, (list, tuple)) and len(sampling_params) == count \
                and all(isinstance(p, SamplingParams) for p in sampling_params):
            return list(sampling_params)
        raise ValueError("sampling_params must be a SamplingParams or a list of them, one per prompt")

    def _generator(self, params: SamplingParams, sample_index: int) -> torch.Generator:
        """The sequence's own RNG: from the request's seed, else drawn from the engine's seed."""
        if params.seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        else:
            seed = params.seed if sample_index == 0 else hash((params.seed, sample_index)) % 2**62
        return torch.Generator(device=self.device).manual_seed(seed)

    def _completion(self, seq: Sequence) -> CompletionOutput:
        token_ids = seq.output_token_ids
        text = seq.text
        if text is None:
            text = "" if self.tokenizer is None else self.tokenizer.decode(
                token_ids, skip_special_tokens=seq.params.skip_special_tokens)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = []
            for token, (lp, rank, top_ids, top_lps) in zip(token_ids, seq.step_logprobs):
                entry = {t: Logprob(v, r + 1, self._decode_token(t))
                         for r, (t, v) in enumerate(zip(top_ids, top_lps))}
                entry.setdefault(token, Logprob(lp, rank, self._decode_token(token)))
                logprobs.append(entry)
        return CompletionOutput(seq.sample_index, text, token_ids, seq.cumulative_logprob, logprobs,
                                seq.finish_reason, seq.stop_reason)
