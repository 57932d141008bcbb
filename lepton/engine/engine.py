"""``Engine``: load a checkpoint and serve it (generate, chat, forward, embed, classify).

    engine = Engine("path/or/hub-id")
    outs = engine.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text

Every argument is checked before anything loads (ValueError naming it). Generation is the serving
loop of engine_core.py (scheduler, block manager, sampler); the cache-free tasks live in tasks.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os

import torch

from lepton.model_executor import setup
from lepton.config import EngineConfig
from lepton.engine.core import EngineCoreMixin
from lepton.model_executor.layers.linear import prepack_model
from lepton.model_executor.loader import load_model, read_config, resolve_model_path
from lepton.model_executor.model_runner import ModelRunner
from lepton.engine.offline import run_to_completion, stream_request
from lepton.outputs import RequestOutput
from lepton.sampling_params import RequestOutputKind, SamplingParams
from lepton.engine.tasks import TasksMixin
from lepton.tokenizer import apply_chat_template, encode, load_tokenizer

logger = logging.getLogger(__name__)


class Engine(EngineCoreMixin, TasksMixin):
    """An inference engine for one Hugging Face checkpoint (see DESIGN.md for every argument).

    ``model``: a local folder or a hub id; None loads the default embedding model
    (all-MiniLM-L6-v2, from the ``lepton[demo]`` extra). Causal LMs are served with continuous
    batching (engine_core.py: add_request / step / abort; ``generate`` drives that loop).
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
        self.block_manager = self.scheduler = None
        if self.is_generative:
            self._init_kv_cache()
        self.eos_token_ids = setup.eos_token_ids(self.model_path, self.hf_config, self.tokenizer)
        self._request_counter = itertools.count()

    def _init_kv_cache(self) -> None:
        num_blocks, self.max_model_len = setup.plan_kv_cache(self.config, self.runner, self.model,
                                                             self.dtype, self.max_model_len)
        self.runner.allocate_kv_cache(num_blocks, self.config.block_size, self.dtype)
        self._init_serving(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens, max_model_len %d", num_blocks,
                    self.config.block_size, self.max_model_len)

    # ---- input checks ---------------------------------------------------------------------
    def check_prompt(self, token_ids: list[int], index: int | str, generation: bool) -> None:
        """ValueError for an empty prompt, out-of-vocabulary ids, or one too long to process.
        ``index``: the prompt's position in a call, or a label such as "request r1"."""
        label = f"prompt {index}" if isinstance(index, int) else index
        if not token_ids:
            raise ValueError(f"{label} is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ValueError(f"{label}: token ids must be integers")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{label}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        limit = self.max_model_len - 1 if generation else self.max_model_len
        if len(token_ids) > limit:
            room = " and leave room for one generated token" if generation else ""
            raise ValueError(f"{label} has {len(token_ids)} tokens; it must fit max_model_len "
                             f"({self.max_model_len}){room}")

    def _require_generative(self, what: str) -> None:
        if not self.is_generative:
            raise ValueError(f"{what} needs a causal language model; {self.hf_config['architectures'][0]} "
                             "is not one (use embed / classify / forward)")

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); one RequestOutput per prompt,
        in order. All prompts are queued at once and served with continuous batching;
        ``use_tqdm`` shows a progress bar (prompts done, input and output tokens/s)."""
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
        return self._generate(texts, ids, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to a conversation [{"role", "content"}, ...] or a list of conversations,
        formatted by the tokenizer's chat template (or ``chat_template``)."""
        self._require_generative("chat")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a conversation (list of dicts) or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        ids = [apply_chat_template(self.tokenizer, list(c), chat_template, add_generation_prompt)
               for c in conversations]
        texts = [self.tokenizer.decode(t) for t in ids]
        return self._generate(texts, ids, sampling_params, use_tqdm)

    def stream(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
               *, priority: int = 0):
        """A generator of one request's outputs as tokens arrive (it steps the engine itself);
        cumulative by default, deltas with SamplingParams(output_kind=RequestOutputKind.DELTA).
        Breaking out of it aborts the request. Many concurrent streams: see AsyncEngine."""
        request = self.make_request(request_id or f"stream-{next(self._request_counter)}", prompt,
                                    sampling_params, priority=priority)
        return stream_request(self, request)

    def _generate(self, texts: list[str | None], ids: list[list[int]], sampling_params,
                  use_tqdm: bool = True) -> list[RequestOutput]:
        params = self._params_per_prompt(sampling_params, len(ids))
        # Validate every prompt before queueing any, so a bad one leaves the engine untouched.
        # A prefix of their own keeps these ids apart from ids callers pass to add_request.
        requests = [self.make_request(f"generate-{next(self._request_counter)}", tokens,
                                      dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY),
                                      prompt_text=text, label=f"prompt {i}")
                    for i, (text, tokens, p) in enumerate(zip(texts, ids, params))]
        return run_to_completion(self, requests, use_tqdm)

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
