"""``Engine``: load a checkpoint and serve it (generate, chat, stream, forward, embed, classify).

    engine = Engine("path/or/hub-id")
    outs = engine.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text

A thin front-end over composed parts, each with one job:
    input processor   prompts -> validated Requests (input_processor.py)
    engine core       scheduler + block manager + executor: add / step / abort (core.py)
    output processor  tokens -> text, stop strings, logprobs, RequestOutputs (output_processor.py)
    tasks             cache-free forwards: preprocess / forward / embed / classify (tasks.py)

One stepping loop drives generation: ``step_routed`` runs one core step, lets the output
processor turn it into RequestOutputs and hands each to its owner, the sink its request was
added with (generate's collector, a stream's queue, an AsyncEngine stream). Outputs of requests
added without a sink (``add_request``) are what ``step()`` returns. So several callers may
generate, stream and step at once, from several threads, and each gets its own outputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections import deque

import torch

from lepton.config import EngineConfig
from lepton.engine.core import EngineCore
from lepton.engine.fair_lock import FairLock
from lepton.engine.input_processor import InputProcessor, ModelLimits
from lepton.engine.metrics import EngineStats, IterationStats, log_stats
from lepton.engine.output_processor import OutputProcessor
from lepton.engine.progress import Progress
from lepton.engine.sequence import Request
from lepton.engine.structured_output.grammar import GrammarCompiler
from lepton.engine.structured_output.manager import StructuredOutputManager
from lepton.engine.tasks import Batch, TaskRunner
from lepton.model_executor import setup
from lepton.model_executor.executor import make_executor
from lepton.model_executor.loader import read_config, resolve_model_path
from lepton.model_executor.quantized_checkpoints import describe_quantization
from lepton.outputs import RequestOutput
from lepton.sampling_params import RequestOutputKind, SamplingParams
from lepton.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class Engine:
    """An inference engine for one Hugging Face checkpoint; the arguments are vLLM's (README).

    ``model``: a local folder or a hub id; None loads the default embedding model
    (all-MiniLM-L6-v2, from the ``lepton[demo]`` extra).
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
        # One process, or the driver of tensor_parallel_size ranks (model_executor/parallel/).
        self.executor = make_executor(cfg, self.model_path, self.hf_config, self.dtype)
        try:
            self._assemble(cfg)
        except BaseException:   # no worker process may outlive a failed start
            self.executor.shutdown()
            raise

    def _assemble(self, cfg: EngineConfig) -> None:
        """The parts around the executor: tokenizer, limits, KV cache, core, processors."""
        model = self.executor.model
        logger.info("model %s: %s on %s, quantization: %s", self.hf_config["architectures"][0],
                    str(self.dtype).removeprefix("torch."), self.device,
                    describe_quantization(self.hf_config, cfg.quantization))
        self.tokenizer = load_tokenizer(self.model_path)
        self.vocab_size = int(getattr(model, "vocab_size", None) or self.hf_config["vocab_size"])
        self.max_model_len = setup.resolve_max_model_len(cfg, self.hf_config, model, self.model_path)
        self.is_generative = hasattr(model, "compute_logits") and hasattr(model, "attention_layers")
        eos_token_ids = setup.eos_token_ids(self.model_path, self.hf_config, self.tokenizer)
        # One step (core + output processor) or cache-free forward at a time; fair, so a step
        # waiting for it runs before the next forward of an embedding batch (fair_lock.py).
        self._lock = FairLock()
        self.core: EngineCore | None = None
        self.num_kv_blocks = 0
        if self.is_generative:
            self.num_kv_blocks, self.max_model_len = self.executor.plan_kv_cache(self.max_model_len)
            self.executor.allocate_kv_cache(self.num_kv_blocks, self.max_model_len)
            self.core = EngineCore(self.executor, self.num_kv_blocks, block_size=cfg.block_size,
                                   max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens,
                                   enable_prefix_caching=cfg.enable_prefix_caching,
                                   eos_token_ids=eos_token_ids)
            if self.tokenizer is not None:   # built on the first structured request
                self.core.structured = StructuredOutputManager(
                    lambda: GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids))
            logger.info("KV cache: %d blocks of %d tokens, max_model_len %d", self.num_kv_blocks,
                        cfg.block_size, self.max_model_len)
        self.input_processor = InputProcessor(self.tokenizer, ModelLimits(
            self.vocab_size, self.max_model_len, self.is_generative, self.hf_config["architectures"][0],
            cfg.max_num_seqs, self.num_kv_blocks * cfg.block_size if self.is_generative else None,
            cfg.block_size))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.tasks = TaskRunner(self.executor, self.input_processor, self.tokenizer,
                                setup.make_pooler(model, self.model_path), cfg.max_num_batched_tokens,
                                self._lock, busy=self._generating)
        self._request_counter = itertools.count()
        self._unclaimed: list[RequestOutput] = []   # outputs of sink-less requests, for step()
        self.stat_loggers: list = []   # fn(IterationStats) after each step and abort (/metrics)
        self.eos_token_ids = eos_token_ids

    @property
    def model(self) -> torch.nn.Module:
        return self.executor.model

    def shutdown(self) -> None:
        """Release the executor: a tensor-parallel engine's worker processes end here (also at
        interpreter exit). Idempotent; the engine serves no more requests after it."""
        self.executor.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Tokens that end a completion (generation_config.json's, config.json's, the tokenizer's)."""
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self._eos_token_ids = frozenset(int(i) for i in ids)
        if self.core is not None:
            self.core.eos_token_ids = self._eos_token_ids
        self.executor.eos_token_ids = self._eos_token_ids

    def _generating(self) -> bool:
        """Generation requests are in flight (a snapshot: never waits for a step)."""
        if self.core is None:
            return False
        stats = self.core.stats()
        return stats.num_running + stats.num_waiting > 0

    # ---- the serving loop ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, *,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Queue a prompt (string or token ids); its outputs come from ``step()``."""
        self.add_processed(self.input_processor.process(request_id, prompt, params,
                                                        arrival_time=arrival_time, priority=priority))

    def add_processed(self, request: Request, sink=None) -> None:
        """Queue a request made by ``input_processor.process``; ``sink(output)`` receives its
        outputs (None: ``step()`` returns them)."""
        self.input_processor.require_generative("generation")
        with self._lock:
            self.core.add_request(request)
            self.output_processor.add_request(request, sink)

    def step_routed(self) -> bool:
        """Run one step and hand every output to its owner; False when there was nothing to run."""
        with self._lock:
            core_output = self.core.step()
            stopped = self.output_processor.process(core_output)
            if stopped:
                self.core.finish_stopped(stopped)
            outputs = self.output_processor.outputs()
            if self.stat_loggers and core_output.num_scheduled:
                log_stats(self.stat_loggers, IterationStats.of_step(core_output))
            for out, sink in outputs:
                if sink is None:
                    self._unclaimed.append(out)
                else:
                    sink(out)
            return core_output.num_scheduled > 0 or core_output.num_compiling > 0

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; RequestOutputs of the requests added with add_request that
        made progress (outputs produced meanwhile by other callers' steps come first)."""
        self.input_processor.require_generative("step")
        with self._lock:
            if not self._unclaimed:
                self.step_routed()
            outputs, self._unclaimed = self._unclaimed, []
            return outputs

    def abort(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Stop requests now and free their blocks; returns their final outputs (finish_reason
        "abort"), which also reach their sinks. Unknown or finished ids are ignored."""
        if self.core is None:
            return []
        outputs = []
        with self._lock:
            aborted = self.core.abort(request_id)
            for request in aborted:
                routed = self.output_processor.abort(request)
                if routed is None:
                    continue
                out, sink = routed
                outputs.append(out)
                if sink is not None:
                    sink(out)
            if self.stat_loggers and aborted:
                log_stats(self.stat_loggers, IterationStats.of_abort(aborted))
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests in flight, or outputs that the next step() still has to hand out."""
        return self.core is not None and (self.core.has_unfinished_requests() or bool(self._unclaimed))

    def stats(self) -> EngineStats:
        """A snapshot: queues, KV-cache use, prefix-cache queries and hits, counters (never waits
        for a step; what /metrics reads)."""
        if self.core is None:
            return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0)
        return self.core.stats()

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt (a string, a list of token ids, or vLLM's dict {"prompt" or
        "prompt_token_ids", optional "cache_salt"}); one RequestOutput per prompt, in order. All
        prompts are queued at once and served with continuous batching; ``use_tqdm`` shows a
        progress bar (prompts done, input and output tokens/s)."""
        self.input_processor.require_generative("generate")
        return self._generate(self.input_processor.prompts(prompts), sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to a conversation [{"role", "content"}, ...] or a list of conversations,
        formatted by the tokenizer's chat template (or ``chat_template``)."""
        self.input_processor.require_generative("chat")
        prompts = self.input_processor.chat(messages, chat_template, add_generation_prompt)
        return self._generate(prompts, sampling_params, use_tqdm)

    def _generate(self, prompts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        params = self.input_processor.params_per_prompt(sampling_params, len(prompts))
        # Validate every prompt before queueing any, so a bad one leaves the engine untouched.
        # A prefix of their own keeps these ids apart from ids callers pass to add_request.
        requests = [self.input_processor.process(
            f"generate-{next(self._request_counter)}", prompt,
            dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY), label=f"prompt {i}")
            for i, (prompt, p) in enumerate(zip(prompts, params))]
        return self._run_to_completion(requests, use_tqdm)

    def _run_to_completion(self, requests: list[Request], use_tqdm: bool) -> list[RequestOutput]:
        """Final outputs of ``requests``, in order. On any exception (KeyboardInterrupt included)
        those still running are aborted, so no cache block outlives the call."""
        results: list[RequestOutput | None] = [None] * len(requests)
        progress = Progress(len(requests)) if use_tqdm else None

        def collector(i: int):
            def sink(out: RequestOutput) -> None:
                if out.finished:
                    results[i] = out
                    if progress is not None:
                        progress.update(out)
            return sink

        added = []
        try:
            for i, request in enumerate(requests):
                self.add_processed(request, collector(i))
                added.append(request.request_id)
            while not all(r is not None for r in results):
                if not self.step_routed():
                    with self._lock:   # another caller's step may have just finished ours
                        if any(r is None for r in results) and not self.core.has_unfinished_requests():
                            raise RuntimeError("the scheduler went idle with requests unfinished")
        except BaseException:
            self.abort([rid for rid, out in zip(added, results) if out is None])
            raise
        finally:
            if progress is not None:
                progress.close()
        return results

    def stream(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
               *, priority: int = 0):
        """A generator of one request's outputs as tokens arrive (it steps the engine itself);
        cumulative by default, deltas with SamplingParams(output_kind=RequestOutputKind.DELTA).
        Breaking out of it aborts the request. Many concurrent streams: see AsyncEngine."""
        request = self.input_processor.process(request_id or f"stream-{next(self._request_counter)}",
                                               prompt, sampling_params, priority=priority)
        return self._stream(request)

    def _stream(self, request: Request):
        queue: deque[RequestOutput] = deque()
        finished = False
        self.add_processed(request, queue.append)
        try:
            while not finished:
                while queue and not finished:
                    out = queue.popleft()
                    finished = out.finished
                    yield out
                if not finished:
                    self.step_routed()
        finally:
            if not finished:
                self.abort(request.request_id)

    # ---- cache-free tasks (tasks.py) ------------------------------------------------------------
    def preprocess(self, inputs) -> Batch:
        """A text, a list of texts, a list of token ids, or a list of those -> Batch."""
        return self.tasks.preprocess(inputs)

    def forward(self, batch) -> dict:
        """The model's outputs for a Batch (or anything preprocess takes); see tasks.py."""
        return self.tasks.forward(batch)

    def embed(self, texts) -> torch.Tensor:
        """Embeddings [B, d] (float32, CPU) of a text or a list of texts (or token-id lists)."""
        return self.tasks.embed(texts)

    def classify(self, texts, labels: list[str] | None = None) -> dict:
        """{"logits", "labels", "probabilities", "label_names"}; see tasks.py."""
        return self.tasks.classify(texts, labels)
