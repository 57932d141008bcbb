"""``AsyncEngine``: one Engine shared by many asyncio callers (the server's view of the engine).

    engine = AsyncEngine(Engine("path"))
    async for out in engine.stream("Hello", SamplingParams(max_tokens=64), request_id="r1"):
        print(out.outputs[0].text)            # cumulative, or only the new text with
                                              # SamplingParams(output_kind=RequestOutputKind.DELTA)

A background thread steps the engine while requests are in flight and hands each RequestOutput
to the event loop of the caller that owns the request (loop.call_soon_threadsafe), so the event
loop never waits for a forward. New requests and aborts are queued for that thread and applied
between steps; an abort is applied at once when no step is running. A caller that stops
iterating (client disconnect, task cancelled, break) aborts its request, which frees its cache
blocks within one step. If a step raises, every stream gets the error and ``errored`` is set
(a server's /health turns 503).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import AsyncIterator

from lepton.outputs import RequestOutput
from lepton.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; no request can be served."""


class AsyncEngine:
    def __init__(self, engine):
        self.engine = engine
        self.errored: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending_adds: list = []
        self._pending_aborts: list[str] = []
        self._mutex = threading.Lock()          # guards the three containers above
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
        request = self.engine.make_request(request_id or uuid.uuid4().hex, prompt, params, priority=priority)
        async for out in self.stream_prepared(request):
            yield out

    def submit(self, request) -> asyncio.Queue:
        """Queue a request made by Engine.make_request, now (no await: a server counts it at
        once); returns the queue that ``outputs`` reads. Must run on the caller's event loop."""
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
        """The outputs of a submitted request; stopping early (break, cancel) aborts it."""
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._mutex:
                self._streams.pop(request_id, None)
            if not finished:
                self._abort_soon(request_id)

    async def stream_prepared(self, request) -> AsyncIterator[RequestOutput]:
        """``stream`` for a request already made (and so validated) by Engine.make_request."""
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
        """Requests queued and not running yet (read without the engine lock: a gauge)."""
        return len(self.engine.scheduler.waiting) + len(self._pending_adds)

    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    async def abort(self, request_id: str) -> None:
        self._abort_soon(request_id)

    def _abort_soon(self, request_id: str) -> None:
        # Abort right away when no step holds the engine; otherwise right after the step.
        if self.engine._lock.acquire(blocking=False):
            try:
                self._abort_now([request_id])
            finally:
                self.engine._lock.release()
        else:
            with self._mutex:
                self._pending_aborts.append(request_id)
            self._wakeup.set()

    def _abort_now(self, request_ids: list[str]) -> None:
        """(Engine lock held.) Abort, and hand each stream still listening its final output:
        the engine's, or an empty aborted one for a request that never reached the engine."""
        dropped = set(request_ids)
        with self._mutex:
            never_added = [r for r in self._pending_adds if r.request_id in dropped]
            self._pending_adds = [r for r in self._pending_adds if r.request_id not in dropped]
        for out in self.engine.abort(list(dropped)):
            self._deliver(out.request_id, out)
        for request in never_added:
            self._deliver(request.request_id, RequestOutput(request.request_id, request.prompt,
                                                            request.prompt_token_ids, [], finished=True))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: abort what is in flight and join the thread."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- the loop thread ----------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        with self._mutex:
            target = self._streams.get(request_id)
            if getattr(item, "finished", True):   # the last item: forget the stream even if
                self._streams.pop(request_id, None)   # nobody ever reads it
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:   # the caller's loop is closed: nobody is listening any more
            with self._mutex:
                self._pending_aborts.append(request_id)

    def _apply_pending(self) -> None:
        with self._mutex:
            aborts, self._pending_aborts = self._pending_aborts, []
        if aborts:
            self._abort_now(aborts)
        with self._mutex:
            adds, self._pending_adds = self._pending_adds, []
        for request in adds:
            try:
                self.engine.add_prepared(request)
            except ValueError as err:
                self._deliver(request.request_id, err)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopped:
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                with engine._lock:
                    self._apply_pending()
                while engine.has_unfinished_requests() and not self._stopped:
                    with engine._lock:
                        self._apply_pending()
                        outputs = engine.step()
                    for out in outputs:
                        self._deliver(out.request_id, out)
        except BaseException as err:  # a dead loop must not hang its callers
            self.errored = err
            with self._mutex:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, EngineDeadError(f"the engine loop failed: {type(err).__name__}: {err}"))
        finally:   # shut down: in-flight requests end with finish_reason "abort"
            with engine._lock:
                with self._mutex:
                    never_added = [r.request_id for r in self._pending_adds]
                    self._pending_adds = []
                for out in engine.abort(list(engine._requests)):
                    self._deliver(out.request_id, out)
                for rid in never_added:
                    self._deliver(rid, EngineDeadError("the engine is shutting down"))
