"""Offline generation: queue a batch of requests and step the engine until all are done."""

from __future__ import annotations

import time
from typing import Iterator

from lepton.outputs import RequestOutput
from lepton.engine.sequence import Request


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True,
                postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")


def run_to_completion(engine, requests: list[Request], use_tqdm: bool = False) -> list[RequestOutput]:
    """Final RequestOutputs of ``requests``, in order. Other requests in flight keep running; their
    outputs wait for the next ``engine.step()``. On any exception (KeyboardInterrupt included) the
    requests still running are aborted, so no cache block outlives the call."""
    wanted = {r.request_id: i for i, r in enumerate(requests)}
    results: list[RequestOutput | None] = [None] * len(requests)
    bar = _progress_bar(len(requests)) if use_tqdm else None
    start, num_in, num_out, done = time.perf_counter(), 0, 0, 0
    added: list[str] = []
    foreign: list[RequestOutput] = []
    with engine._lock:   # one offline batch at a time; other threads' steps wait
        try:
            for request in requests:
                engine.add_prepared(request)
                added.append(request.request_id)
            while done < len(requests):
                outputs = engine.step()
                if not outputs and not engine.scheduler.has_unfinished():
                    raise RuntimeError("the scheduler went idle with requests unfinished")
                for out in outputs:
                    i = wanted.get(out.request_id)
                    if i is None:   # someone else's (add_request): their next step() returns it
                        foreign.append(out)
                        continue
                    if not out.finished:
                        continue
                    results[i] = out
                    done += 1
                    if bar is not None:
                        num_in += len(out.prompt_token_ids)
                        num_out += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = time.perf_counter() - start
                        bar.postfix = (f"est. speed input: {num_in / elapsed:.2f} toks/s, "
                                       f"output: {num_out / elapsed:.2f} toks/s")
                        bar.update(1)
        except BaseException:   # only ours, and only those that got in
            engine.abort([rid for rid, out in zip(added, results) if out is None])
            raise
        finally:
            engine._unclaimed_outputs.extend(foreign)
            if bar is not None:
                bar.close()
    return results


def stream_request(engine, request: Request) -> Iterator[RequestOutput]:
    """Queue ``request`` and step the engine, yielding its outputs as they come. Leaving early
    (break, an exception) aborts it; other requests' outputs wait for the next ``step()``."""
    foreign: list[RequestOutput] = []
    finished = False
    engine.add_prepared(request)
    try:
        while not finished:
            for out in engine.step():
                if out.request_id != request.request_id:
                    foreign.append(out)
                    continue
                finished = out.finished
                yield out
    finally:
        if not finished:
            engine.abort(request.request_id)
        with engine._lock:
            engine._unclaimed_outputs.extend(foreign)
