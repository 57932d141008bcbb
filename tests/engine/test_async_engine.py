"""AsyncEngine: concurrent streams, deltas that add up to the final text, cancellation that frees
the cache at once, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from lepton.engine.async_engine import AsyncEngine
from lepton.engine.engine import Engine
from lepton.sampling_params import RequestOutputKind, SamplingParams
from tests.engine import checkpoint

TEXTS = ["Hello world", "这是一个示例文本。", "Paged attention stores keys and values in fixed-size blocks.",
         "naïve café — 東京 🚀", "A", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", max_model_len=128)


@pytest.fixture
def served(engine):
    server = AsyncEngine(engine)
    yield server
    server.shutdown()


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    bm = engine.core.block_manager
    bm.check_invariants()
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks


def test_concurrent_streams_equal_offline_generate(engine, served):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    offline = engine.generate(TEXTS, params)
    delta = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(i: int):
        text, ids, finishes = "", [], []
        async for out in served.stream(TEXTS[i], delta, request_id=f"s{i}"):
            text += out.outputs[0].text
            ids += out.outputs[0].token_ids
            finishes.append(out.outputs[0].finish_reason)
        return text, ids, finishes

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(TEXTS))))

    for (text, ids, finishes), ref in zip(asyncio.run(main()), offline):
        assert ids == ref.outputs[0].token_ids
        assert text == ref.outputs[0].text == engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    wait_idle(engine)


def test_stop_string_is_never_streamed(engine, served):
    base = engine.generate(TEXTS[2], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    full = base.outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 4]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                            output_kind=RequestOutputKind.DELTA)

    async def main():
        return [out async for out in served.stream(TEXTS[2], params)]

    outs = asyncio.run(main())
    text = "".join(o.outputs[0].text for o in outs)
    assert text == full[:full.index(stop)]
    assert outs[-1].outputs[0].finish_reason == "stop" and outs[-1].outputs[0].stop_reason == stop
    wait_idle(engine)


def test_cancel_and_break_free_the_blocks(engine, served):
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def consume(rid: str, started: asyncio.Event):
        async for _ in served.stream(TEXTS[2], params, request_id=rid):
            started.set()

    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(consume("cancelled", started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        count = 0
        async for _ in served.stream(TEXTS[0], params, request_id="broken"):
            count += 1
            if count == 3:
                break          # the async generator is closed: its finally aborts the request
        await asyncio.sleep(0)

    asyncio.run(main())
    wait_idle(engine, timeout=5.0)
    assert engine.stats().num_requests_aborted >= 2


def test_bad_input_raises_before_queueing(engine, served):
    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in served.stream("word " * 200, SamplingParams(max_tokens=4)):
                pass
        with pytest.raises(ValueError, match="empty"):
            await served.generate([], SamplingParams(max_tokens=4))
        out = await served.generate("Hello", SamplingParams(temperature=0, max_tokens=3))
        return out

    out = asyncio.run(main())
    assert out.finished and len(out.outputs[0].token_ids) == 3
    wait_idle(engine)


def test_shutdown_aborts_in_flight_requests(engine):
    server = AsyncEngine(engine)
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)

    async def main():
        outs = []
        async for out in server.stream(TEXTS[0], params, request_id="long"):
            outs.append(out)
            if len(outs) == 2:
                server.shutdown(timeout=5.0)
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert not server.is_running
    wait_idle(engine)


def test_abort_from_another_task_ends_the_stream(engine, served):
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        outs = []

        async def read():
            async for out in served.stream(TEXTS[2], params, request_id="to-abort"):
                outs.append(out)
                if len(outs) == 2:
                    await served.abort("to-abort")

        await asyncio.wait_for(read(), timeout=20)
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    wait_idle(engine)
