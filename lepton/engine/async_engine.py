"""``AsyncEngine``: one Engine shared by many asyncio callers (the server's view of the engine).

    engine = AsyncEngine(Engine("path"))
    async for out in engine.stream("Hello", SamplingParams(max_tokens=64), request_id="r1"):
        print(out.outputs[0].text)            # cumulative, or only the new text with
                                              # SamplingParams(output_kind=RequestOutputKind.DELTA)

A background thread steps the engine (Engine.step_routed) while requests are in flight; each
request's sink hands its RequestOutputs to the event loop of the caller that owns it
(loop.call_soon_threadsafe), so the event loop never waits for a forward. New requests and
aborts are queued for that thread and applied between steps (at once when it is idle). A caller that stops
iterating (client disconnect, task cancelled, break) aborts its request, which frees its cache
blocks within one step. If a step raises, the requests in the engine end with
EngineStepError and are aborted, and the loop serves on; only an error it cannot recover from
(an abort that fails too, or an ExecutorDeadError: a tensor-parallel worker died) stops it and
sets ``errored`` (a server's /health turns 503).

Backpressure: outputs wait in the request's queue until its reader takes them. A reader that
falls behind by more than ``max_buffered_tokens`` output tokens (a client that never reads its
stream) gets its request aborted, so the server holds a bounded amount for it (a token with 20
logprobs is about 4.5 KiB of stream); its stream ends with StreamBackpressureError.
``num_backpressure_aborts`` counts those; ``num_unread()`` counts finished requests whose
outputs still wait for their reader (a server counts them as pending).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from typing import AsyncIterator

from lepton.model_executor.executor import ExecutorDeadError
from lepton.outputs import RequestOutput
from lepton.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; no request can be served."""


class EngineStepError(RuntimeError):
    """A step failed while the request was in flight; the request was aborted, the engine serves on."""


class StreamBackpressureError(RuntimeError):
    """The request was aborted: its reader fell more than max_buffered_tokens behind."""


def _num_tokens(item) -> int:
    """Output tokens a queued item holds (what a reader that falls behind makes us keep)."""
    outputs = getattr(item, "outputs", None)
    return sum(len(c.token_ids) for c in outputs) if outputs else 0


class AsyncEngine:
    def __init__(self, engine, *, max_buffered_tokens: int | None = None):
        self.engine = engine
        self.max_buffered_tokens = max_buffered_tokens   # None: no bound
        self.num_backpressure_aborts = 0
        self._backlog: dict[str, int] = {}     # request id -> output tokens queued, not yet read
        self._unread: set[str] = set()         # finished, but the reader has not taken everything
        self._overflowed: set[str] = set()     # aborted for falling behind
        self.errored: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending_adds: list = []
        self._pending_aborts: list[str] = []
        self._mutex = threading.Lock()          # guards the containers above
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="lepton-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model, **engine_args) -> "AsyncEngine":
        from lepton.engine.engine import Engine

        return cls(Engine(model, **engine_args))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.errored is None

    # ---- requests -------------------------------------------------------------------------------
    async def stream(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     *, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as tokens arrive, the last one with ``finished`` set.
        Bad input raises ValueError before anything is queued."""
        request = self.engine.input_processor.process(request_id or uuid.uuid4().hex, prompt, params,
                                                      priority=priority)
        async for out in self.stream_prepared(request):
            yield out

    def submit(self, request) -> asyncio.Queue:
        """Queue a request made by the engine's input processor, now (no await: a server counts
        it at once); returns the queue that ``outputs`` reads. Must run on the caller's event loop."""
        if self.errored is not None or self._stopped:
            raise EngineDeadError(f"the engine loop has stopped: {self.errored!r}")
        queue: asyncio.Queue = asyncio.Queue()
        with self._mutex:
            if request.request_id in self._streams:
                raise ValueError(f"request_id {request.request_id!r} is already in flight")
            self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
            self._pending_adds.append(request)
        self._wakeup.set()
        return queue

    async def outputs(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """The outputs of a submitted request; stopping early (break, cancel) aborts it. One
        aborted for falling behind ends with its last output, then StreamBackpressureError."""
        try:
            while True:
                item = await queue.get()
                with self._mutex:
                    self._backlog[request_id] = self._backlog.get(request_id, 0) - _num_tokens(item)
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    if request_id in self._overflowed and any(c.finish_reason == "abort" for c in item.outputs):
                        raise StreamBackpressureError(
                            f"the stream was aborted: more than {self.max_buffered_tokens} output tokens "
                            "waited for the client to read them")
                    return
        finally:
            self.release(request_id)

    def release(self, request_id: str) -> None:
        """Let go of a submitted request: what waits for its reader is dropped and, if it still
        runs, it is aborted. ``outputs`` does it when it stops; a caller whose reader may never
        have started (a client gone before its stream began) calls it too. Idempotent."""
        with self._mutex:
            running = self._streams.pop(request_id, None) is not None   # its last output is not out yet
            self._backlog.pop(request_id, None)
            self._unread.discard(request_id)
            self._overflowed.discard(request_id)
        if running:
            self._abort_soon(request_id)

    async def stream_prepared(self, request) -> AsyncIterator[RequestOutput]:
        """``stream`` for a request already made (and so validated) by the input processor."""
        queue = self.submit(request)
        async for out in self.outputs(request.request_id, queue):
            yield out

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       *, priority: int = 0) -> RequestOutput:
        """The final output of one request."""
        out = None
        async for out in self.stream(prompt, params, request_id, priority=priority):
            pass
        return out

    def num_waiting(self) -> int:
        """Requests queued and not running yet (a gauge: never waits for a step)."""
        return self.engine.stats().num_waiting + len(self._pending_adds)

    def num_running(self) -> int:
        return self.engine.stats().num_running

    def num_unread(self) -> int:
        """Finished requests whose outputs still wait for their reader."""
        return len(self._unread)

    def buffered_tokens(self) -> int:
        """Output tokens queued for readers, all requests together."""
        with self._mutex:
            return sum(self._backlog.values())

    async def abort(self, request_id: str) -> None:
        self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        with self._mutex:
            self._pending_aborts.append(request_id)
        self._wakeup.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: abort what is in flight and join the thread."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- the loop thread ----------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        finished = getattr(item, "finished", True)
        with self._mutex:
            target = self._streams.get(request_id)
            if finished:   # the last item: forget the stream even if nobody ever reads it
                self._streams.pop(request_id, None)
            if target is not None:
                backlog = self._backlog[request_id] = self._backlog.get(request_id, 0) + _num_tokens(item)
                if finished:
                    self._unread.add(request_id)
                elif (self.max_buffered_tokens is not None and backlog > self.max_buffered_tokens
                      and request_id not in self._overflowed):
                    # Its reader fell behind (a client that does not read its stream): stop the
                    # request rather than hold its output without bound.
                    self._overflowed.add(request_id)
                    self._pending_aborts.append(request_id)
                    self.num_backpressure_aborts += 1
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:   # the caller's loop is closed: nobody is listening any more
            with self._mutex:
                self._pending_aborts.append(request_id)

    def _sink(self, request_id: str):
        return lambda out: self._deliver(request_id, out)

    def _apply_pending(self) -> None:
        """(Loop thread.) Aborts first, then adds; a request aborted before it was added ends
        with an empty aborted output."""
        with self._mutex:
            aborts, self._pending_aborts = set(self._pending_aborts), []
            never_added = [r for r in self._pending_adds if r.request_id in aborts]
            adds = [r for r in self._pending_adds if r.request_id not in aborts]
            self._pending_adds = []
        if aborts:
            self.engine.abort(list(aborts))   # their final outputs reach the sinks
        for request in never_added:
            self._deliver(request.request_id, RequestOutput(request.request_id, request.prompt,
                                                            request.prompt_token_ids, [], finished=True))
        for request in adds:
            try:
                self.engine.add_processed(request, self._sink(request.request_id))
            except ValueError as err:
                self._deliver(request.request_id, err)

    def _fail_step(self, err: Exception) -> None:
        """(Loop thread.) A step raised: every request the engine holds may have been in it, so
        each ends with EngineStepError and is aborted (freeing its blocks); the loop serves on.
        Should the abort fail too, that error stops the loop (``errored``)."""
        logger.error("an engine step failed; failing the requests in flight", exc_info=err)
        with self._mutex:
            queued = {r.request_id for r in self._pending_adds}   # not in the engine yet: unharmed
            ids = [rid for rid in self._streams if rid not in queued]
        # A dead executor's message says what happened (which worker); other errors stay opaque.
        reason = f": {err}" if isinstance(err, ExecutorDeadError) else ""
        for rid in ids:
            self._deliver(rid, EngineStepError(f"generation failed: the engine step raised "
                                               f"{type(err).__name__}{reason}"))
        self.engine.abort(ids)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopped:
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                self._apply_pending()
                while not self._stopped:
                    self._apply_pending()
                    try:
                        busy = engine.step_routed()
                    except Exception as err:  # noqa: BLE001 (one failed step fails its requests, not the loop)
                        self._fail_step(err)
                        if isinstance(err, ExecutorDeadError):   # no later step can run
                            raise
                        continue
                    if not busy:   # nothing left to run
                        break
        except BaseException as err:  # a dead loop must not hang its callers
            self.errored = err
            with self._mutex:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, EngineDeadError(f"the engine loop failed: {type(err).__name__}: {err}"))
        finally:   # shut down: in-flight requests end with finish_reason "abort"
            with self._mutex:
                never_added = [r.request_id for r in self._pending_adds]
                self._pending_adds = []
                ids = list(self._streams)
            engine.abort(ids)
            for rid in never_added:
                self._deliver(rid, EngineDeadError("the engine is shutting down"))
