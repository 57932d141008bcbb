"""Load through the async openai client: 64 concurrent streaming chats lose and duplicate no token
(each equals the same request run alone, greedy), and 32 clients that hang up mid-stream get
their requests aborted; either way /metrics comes back to idle (nothing running or waiting, no
KV block in use)."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.server.conftest import API_KEY, IDLE, MODEL_NAME, async_client, auth, read_metrics, wait_idle

N_CONCURRENT = 64
N_DISCONNECT = 32
MAX_TOKENS = 12
LONG_MAX_TOKENS = 200       # a hung-up request would run this long if it were not aborted


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}: the quick brown fox number {i * 7 % 13} jumps."}]


def test_64_concurrent_streams_equal_alone(server, client):
    alone = [client.chat.completions.create(model=MODEL_NAME, messages=messages(i), max_tokens=MAX_TOKENS,
                                            temperature=0, extra_body={"ignore_eos": True})
             for i in range(N_CONCURRENT)]

    async def one(ac, i):
        stream = await ac.chat.completions.create(model=MODEL_NAME, messages=messages(i), max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        text, finishes, usage = [], [], None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finishes.append(choice.finish_reason)
        return "".join(text), finishes, usage

    async def main():
        async with async_client(server.url, timeout=120.0) as ac:
            return await asyncio.wait_for(asyncio.gather(*(one(ac, i) for i in range(N_CONCURRENT))), 180)

    results = asyncio.run(main())
    for i, ((text, finishes, usage), ref) in enumerate(zip(results, alone)):
        assert text == ref.choices[0].message.content, f"request {i}: streamed text differs from alone"
        assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}, (i, finishes)
        assert usage is not None and usage.completion_tokens == MAX_TOKENS, (i, usage)
        assert usage.prompt_tokens == ref.usage.prompt_tokens
    wait_idle(server.url, timeout=5.0)


def test_32_disconnects_mid_stream_abort(server, client):
    before = read_metrics(server.url)
    received = []

    async def one(ac, i):
        stream = await ac.chat.completions.create(model=MODEL_NAME, messages=messages(100 + i),
                                                  max_tokens=LONG_MAX_TOKENS, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        n = 0
        async for chunk in stream:
            n += 1
            if n == 3:
                break
        await stream.close()            # hang up: the connection closes with the stream unread
        received.append(n)

    async def main():
        async with async_client(server.url, timeout=120.0) as ac:
            await asyncio.wait_for(asyncio.gather(*(one(ac, i) for i in range(N_DISCONNECT))), 120)

    start = time.monotonic()
    asyncio.run(main())
    assert received == [3] * N_DISCONNECT
    after = wait_idle(server.url, timeout=10.0)
    elapsed = time.monotonic() - start
    generated = after["lepton_generation_tokens_total"] - before["lepton_generation_tokens_total"]
    full = N_DISCONNECT * LONG_MAX_TOKENS
    assert generated < full / 2, (f"{generated:.0f} tokens generated for {N_DISCONNECT} clients that hung up "
                                  f"after 3 chunks ({full} if none was aborted; idle after {elapsed:.1f} s)")
    # The server still serves.
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages(0), max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert {name: read_metrics(server.url)[name] for name in IDLE} == IDLE


def test_non_streaming_clients_that_give_up_abort(server, client):
    """16 non-streaming requests (n=8, 200 tokens each) whose clients time out after 0.5 s: the
    server aborts them instead of generating the 25600 tokens nobody will read."""
    before = read_metrics(server.url)
    body = {"model": MODEL_NAME, "messages": messages(7), "max_tokens": LONG_MAX_TOKENS, "n": 8,
            "temperature": 1.0, "seed": 0, "ignore_eos": True}

    async def one(ac):
        try:
            await ac.post("/v1/chat/completions", json=body)
            return "answered"
        except httpx.TimeoutException:
            return "gave up"

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=auth(API_KEY), timeout=0.5) as ac:
            return await asyncio.gather(*(one(ac) for _ in range(16)))

    outcomes = asyncio.run(main())
    # 25600 tokens cannot be generated in 0.5 s here: some clients must have hung up.
    assert "gave up" in outcomes, "every request was answered within 0.5 s: nothing was aborted"
    start = time.monotonic()
    after = wait_idle(server.url, timeout=30.0)
    busy = time.monotonic() - start
    generated = after["lepton_generation_tokens_total"] - before["lepton_generation_tokens_total"]
    full = 16 * 8 * LONG_MAX_TOKENS
    assert generated < full / 2, (f"{generated:.0f} of {full} tokens generated for non-streaming requests "
                                  f"whose clients hung up ({outcomes.count('gave up')} gave up; "
                                  f"busy {busy:.1f} s more before idle)")
