"""The OpenAI-compatible API through the official `openai` client (sync and async) and httpx:
completions (string, strings, token ids), chat, streaming, n, logprobs, embeddings, usage,
tokenize / detokenize, /models, /health and /metrics.

Greedy outputs are checked against lepton's own Engine run in this process (the engine itself is
checked against transformers in tests/engine); usage against the checkpoint's tokenizer.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct

import httpx
import pytest

from tests.server.conftest import (API_KEY_2, HIDDEN_SIZE, MAX_MODEL_LEN, METRIC_NAMES, MODEL_ALIAS,
                                   MODEL_NAME, OVERRIDE_TEMPLATE, async_client, chat_ids, prompt_ids,
                                   read_metrics)

PROMPT = "The quick brown fox"
PROMPT_2 = "Paged attention stores keys"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello world! How are you today?"}]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def reference(model_dir):
    """lepton's Engine in this process: the greedy reference of what the server must return."""
    from lepton.engine.engine import Engine

    return Engine(model_dir, device="cpu", max_model_len=MAX_MODEL_LEN, max_num_seqs=8)


def ref_text(reference, prompt, max_tokens: int) -> str:
    from lepton.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return reference.generate(prompt, params, use_tqdm=False)[0].outputs[0].text


def ref_chat(reference, messages, max_tokens: int) -> str:
    from lepton.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return reference.chat(messages, params, chat_template=OVERRIDE_TEMPLATE, use_tqdm=False)[0].outputs[0].text


# -- process, routes without a key ----------------------------------------------------------------

def test_ready_line_names_host_and_port(server):
    assert server.ready_line is not None, f"no 'ready at http://...' line on stdout\n{server.output_tail()}"
    assert f"ready at http://127.0.0.1:{server.port}" in server.ready_line, server.ready_line


def test_health_and_metrics_need_no_key(server):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    resp = httpx.get(f"{server.url}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain"), resp.headers["content-type"]
    values = read_metrics(server.url)
    missing = [name for name in METRIC_NAMES if name not in values]
    assert not missing, f"/metrics lacks {missing}"
    assert 0.0 <= values["lepton_kv_cache_usage"] <= 1.0
    assert 0.0 <= values["lepton_prefix_cache_hit_rate"] <= 1.0


def test_models(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids and ids[0] == MODEL_NAME, ids


def test_second_served_name_and_second_key(server):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY_2, max_retries=0, timeout=60) as c:
        r = c.completions.create(model=MODEL_ALIAS, prompt=PROMPT, max_tokens=2, **GREEDY)
    assert len(r.choices) == 1 and r.usage.completion_tokens == 2


# -- completions ---------------------------------------------------------------------------------

def test_completion_string(client, http, reference, tokenizer):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, **GREEDY)
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.text == ref_text(reference, PROMPT, 8)
    n_prompt = len(prompt_ids(tokenizer, PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)
    tok = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": PROMPT}).json()
    assert tok["count"] == r.usage.prompt_tokens


def test_completion_list_of_strings(client, reference, tokenizer):
    r = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, PROMPT_2], max_tokens=6, **GREEDY)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1]
    texts = {c.index: c.text for c in r.choices}
    assert texts == {0: ref_text(reference, PROMPT, 6), 1: ref_text(reference, PROMPT_2, 6)}
    assert r.usage.prompt_tokens == len(prompt_ids(tokenizer, PROMPT)) + len(prompt_ids(tokenizer, PROMPT_2))
    assert r.usage.completion_tokens == 12


def test_completion_token_ids(client, reference, tokenizer):
    ids, ids_2 = prompt_ids(tokenizer, PROMPT), prompt_ids(tokenizer, PROMPT_2)
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, **GREEDY)
    assert r.choices[0].text == ref_text(reference, PROMPT, 6)
    assert r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model=MODEL_NAME, prompt=[ids, ids_2], max_tokens=6, **GREEDY)
    texts = {c.index: c.text for c in r.choices}
    assert texts == {0: ref_text(reference, PROMPT, 6), 1: ref_text(reference, PROMPT_2, 6)}
    assert r.usage.prompt_tokens == len(ids) + len(ids_2)


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, **GREEDY)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}, finishes
    usage_chunks = [c for c in chunks if not c.choices]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0], "one usage chunk (choices []), last"
    assert usage_chunks[0].usage.model_dump() == full.usage.model_dump()
    # Without include_usage no chunk carries usage.
    plain = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, stream=True, **GREEDY))
    assert plain and all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_stop_string(client):
    base = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, **GREEDY).choices[0].text
    start = next((i for i in range(2, len(base) - 2) if base[i:i + 2].isascii() and base[i:i + 2].isalnum()), None)
    assert start is not None, f"no ASCII pair to stop at in the greedy text {base!r}"
    stop = base[start:start + 2]
    cut = base[:base.index(stop)]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, stop=stop,
                                              stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logit_bias_forces_a_token(client, tokenizer):
    token = next(t for t in range(8, len(tokenizer))
                 if len(tokenizer.decode([t])) >= 2 and tokenizer.decode([t]).isascii()
                 and tokenizer.decode([t]).strip().isalpha())
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, logit_bias={str(token): 100},
                                  **GREEDY)
    assert r.choices[0].text == tokenizer.decode([token] * 4)


def test_sampling_fields_accepted(client):
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, user="tester", seed=3,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 4})
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_seed_reproducible_and_sampling_random(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(1234) == sample(1234)
    greedy = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, **GREEDY).choices[0].text
    assert any(sample(s) != greedy for s in range(4)), "temperature 1 always returns the greedy text"


def test_n2_completion(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, n=2, temperature=0.8, seed=1,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 10
    # Two prompts x n=2: indices 0..3.
    r = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, PROMPT_2], max_tokens=3, n=2, **GREEDY)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3] and r.usage.completion_tokens == 12


def test_n2_chat_stream(client):
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, n=2, temperature=0.8, seed=2, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    per_index: dict[int, list] = {0: [], 1: []}
    for c in chunks:
        for choice in c.choices:
            per_index[choice.index].append(choice)
    for index, choices in per_index.items():
        finishes = [c.finish_reason for c in choices]
        assert finishes and finishes[-1] == "length" and set(finishes[:-1]) <= {None}, (index, finishes)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert "".join(lp.tokens) == r.choices[0].text   # the pieces each token added
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # The top 3 (plus the sampled token if not among them), keyed by text: distinct tokens that
        # read alike share one key, so there may be fewer; the sampled token's key is its own.
        assert 1 <= len(top) <= 4, top
        assert logprob <= 0 and all(v <= 0 for v in top.values())
        assert math.isclose(top[token], logprob, abs_tol=1e-6), (token, logprob, top)
        assert logprob >= max(top.values()) - 1e-4, "greedy picked a token below the top"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, logprobs=True,
                                       top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        assert entry.logprob >= max(t.logprob for t in entry.top_logprobs) - 1e-4


# -- chat ----------------------------------------------------------------------------------------

def test_chat(client, http, reference, tokenizer):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, **GREEDY)
    assert r.object == "chat.completion" and r.model == MODEL_NAME
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == ref_chat(reference, MESSAGES, 8)
    n_prompt = len(chat_ids(tokenizer, MESSAGES, OVERRIDE_TEMPLATE))     # --chat-template FILE, not the tokenizer's
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 8)
    assert http.post("/tokenize", json={"messages": MESSAGES}).json()["count"] == n_prompt


def test_chat_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=5, **GREEDY)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == full.choices[0].message.content
    roles = [c.choices[0].delta.role for c in with_choices if c.choices[0].delta.role]
    assert set(roles) <= {"assistant"}
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}, finishes
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_sse_wire_format(http):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    import json as _json

    payloads = [_json.loads(e[len("data: "):]) for e in events[:-1]]
    assert sum(1 for p in payloads if p["choices"] == []) == 1 and payloads[-1]["usage"]["completion_tokens"] == 4


# -- embeddings ----------------------------------------------------------------------------------

def _hf_last_token_states(model_dir, tokenizer, texts):
    import torch

    from tests.models.conftest import load_hf_model

    hf = load_hf_model(model_dir)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([prompt_ids(tokenizer, text)])
            out.append(hf.model(input_ids=ids).last_hidden_state[0, -1].tolist())
    return out


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings(client, http, model_dir, tokenizer):
    texts = ["Hello world", PROMPT, "A"]
    single = client.embeddings.create(model=MODEL_NAME, input=texts[0])     # the client asks for base64
    assert single.object == "list" and len(single.data) == 1 and single.data[0].index == 0
    vec = single.data[0].embedding
    assert len(vec) == HIDDEN_SIZE and all(math.isfinite(v) for v in vec)
    assert single.usage.prompt_tokens == len(prompt_ids(tokenizer, texts[0]))

    batch = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.usage.prompt_tokens == sum(len(prompt_ids(tokenizer, t)) for t in texts)
    assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4) for a, b in zip(batch.data[0].embedding, vec))
    assert _cos(batch.data[0].embedding, batch.data[1].embedding) < 0.9999

    ids = client.embeddings.create(model=MODEL_NAME, input=[prompt_ids(tokenizer, t) for t in texts],
                                   encoding_format="float")
    for a, b in zip(ids.data, batch.data):
        assert all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-4) for x, y in zip(a.embedding, b.embedding))

    # Raw base64: little-endian float32, the same vector.
    raw = http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": texts[0], "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    data = base64.b64decode(raw.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(data) // 4}f", data)
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(decoded, vec))

    # Causal LM: last-token pooling of the final (normed) hidden states, up to a scale (normalization).
    for served, hf in zip(batch.data, _hf_last_token_states(model_dir, tokenizer, texts)):
        assert _cos(served.embedding, hf) > 0.999


# -- tokenize / detokenize -----------------------------------------------------------------------

def test_tokenize_detokenize(http, tokenizer):
    resp = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": PROMPT})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tokens"] == prompt_ids(tokenizer, PROMPT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    plain = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert plain["tokens"] == list(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == chat_ids(tokenizer, MESSAGES, OVERRIDE_TEMPLATE)
    text = "naïve café — 東京, Hello world!"
    ids = prompt_ids(tokenizer, text)
    back = http.post("/detokenize", json={"model": MODEL_NAME, "tokens": ids})
    assert back.status_code == 200, back.text
    assert back.json()["prompt"] == tokenizer.decode(ids)


# -- async client --------------------------------------------------------------------------------

def test_async_client(server, client):
    sync_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, **GREEDY).choices[0].text
    sync_chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6,
                                               **GREEDY).choices[0].message.content

    async def main():
        async with async_client(server.url) as ac:
            text = (await ac.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, **GREEDY)).choices[0].text
            chat = (await ac.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6,
                                                     **GREEDY)).choices[0].message.content
            stream = await ac.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6,
                                                      stream=True, **GREEDY)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            emb = await ac.embeddings.create(model=MODEL_NAME, input=PROMPT)
            return text, chat, streamed, len(emb.data[0].embedding)

    assert asyncio.run(main()) == (sync_text, sync_chat, sync_chat, HIDDEN_SIZE)


# -- metrics follow the requests -----------------------------------------------------------------

def test_metrics_count_tokens_and_latencies(client, server):
    before = read_metrics(server.url)
    # A prompt no earlier test sent, so no prefix-cache hit shrinks what is computed.
    r = client.completions.create(model=MODEL_NAME, prompt="Der schnelle braune Fuchs springt", max_tokens=7,
                                  **GREEDY)
    after = read_metrics(server.url)
    assert after["lepton_prompt_tokens_total"] - before["lepton_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["lepton_generation_tokens_total"] - before["lepton_generation_tokens_total"] == 7
    for hist in ("lepton_time_to_first_token_seconds", "lepton_e2e_request_latency_seconds"):
        assert after[f"{hist}_count"] - before[f"{hist}_count"] == 1, hist
    assert after["lepton_inter_token_latency_seconds_count"] - before["lepton_inter_token_latency_seconds_count"] == 6


# -- defaults, content parts, streamed logprobs ---------------------------------------------------

def test_openai_default_max_tokens(client, tokenizer):
    """No generation_config.json default here: completions stop at OpenAI's 16 tokens, chat runs to
    the end of the context."""
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    n_prompt = len(chat_ids(tokenizer, MESSAGES, OVERRIDE_TEMPLATE))
    assert r.usage.completion_tokens == MAX_MODEL_LEN - n_prompt and r.choices[0].finish_reason == "length"


def test_chat_content_parts(client):
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, **GREEDY)
    r = client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=6, **GREEDY)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens


def test_streamed_logprobs(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, logprobs=True,
                                          top_logprobs=2, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, logprobs=True,
                                                 top_logprobs=2, stream=True, **GREEDY))
    entries = [e for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content
               for e in ch.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in entries] == \
           [(e.token, round(e.logprob, 4)) for e in full.choices[0].logprobs.content]
    comp = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, logprobs=2, stream=True,
                                          **GREEDY))
    tokens = [t for c in comp for ch in c.choices if ch.logprobs for t in (ch.logprobs.tokens or [])]
    assert len(tokens) == 6
