"""Issue 13, item 5, in the AsyncEngine: outputs a reader has not taken are bounded by
max_buffered_tokens (past it the request is aborted), and finished requests with outputs still
unread are counted (num_unread), as a server's --max-pending needs."""

from __future__ import annotations

import asyncio
import time

import pytest

from lepton.engine.async_engine import AsyncEngine, StreamBackpressureError
from lepton.engine.engine import Engine
from lepton.sampling_params import RequestOutputKind, SamplingParams
from tests.engine import checkpoint

LIMIT = 8
DELTA = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, output_kind=RequestOutputKind.DELTA)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", max_model_len=128)


@pytest.fixture
def served(engine):
    server = AsyncEngine(engine, max_buffered_tokens=LIMIT)
    yield server
    server.shutdown()


async def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_reader_that_falls_behind_gets_its_request_aborted(engine, served):
    async def main():
        request = engine.input_processor.process("slow", "Hello", DELTA)
        queue = served.submit(request)
        await until(lambda: not engine.has_unfinished_requests() and served.num_unread() == 1)
        buffered = served.buffered_tokens()
        outs, error = [], None
        try:
            async for out in served.outputs("slow", queue):
                outs.append(out)
        except StreamBackpressureError as err:
            error = err
        return buffered, outs, error

    buffered, outs, error = asyncio.run(main())
    # One token per step: the step that makes LIMIT + 1 tokens wait aborts it, before the next.
    assert buffered == LIMIT + 1
    assert sum(len(o.outputs[0].token_ids) for o in outs) == LIMIT + 1
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert error is not None and str(LIMIT) in str(error)
    assert served.num_backpressure_aborts == 1
    assert served.num_unread() == 0 and served.buffered_tokens() == 0
    bm = engine.core.block_manager
    assert bm.num_free_blocks == bm.num_blocks   # its blocks came back


def test_a_finished_request_counts_as_unread_until_its_reader_is_done(engine):
    served = AsyncEngine(engine)   # no bound: the request runs to its end
    try:
        async def main():
            params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            queue = served.submit(engine.input_processor.process("r", "Hello", params))
            await until(lambda: served.num_unread() == 1)
            assert served.buffered_tokens() == 5
            got = [out async for out in served.outputs("r", queue)]
            return got

        got = asyncio.run(main())
        assert got[-1].outputs[0].finish_reason == "length"
        assert served.num_unread() == 0 and served.buffered_tokens() == 0 and served.num_backpressure_aborts == 0
    finally:
        served.shutdown()


def test_a_reader_that_leaves_frees_what_waited_for_it(engine, served):
    async def main():
        queue = served.submit(engine.input_processor.process("gone", "Hello", DELTA))
        await until(lambda: served.num_unread() == 1)
        stream = served.outputs("gone", queue)
        await stream.__anext__()
        await stream.aclose()   # a client that disconnects after one chunk

    asyncio.run(main())
    assert served.num_unread() == 0 and served.buffered_tokens() == 0
