"""The Engine API: forward dicts, embed, classify (head and zero-shot), kernels=, quantization, and
the bad-input list (each a ValueError naming the problem)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lepton_kernels
from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams
from lepton.engine.tasks import ZERO_SHOT_SCALE
from tests.engine import checkpoint
from tests.models.conftest import load_hf_model

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "这是一个示例文本。"]
_ENGINES: dict[str, Engine] = {}


@pytest.fixture
def engine_for(tmp_path_factory):
    def get(arch: str, **kwargs) -> Engine:
        if arch not in _ENGINES:
            _ENGINES[arch] = Engine(checkpoint(tmp_path_factory, arch), device="cpu", **kwargs)
        return _ENGINES[arch]
    return get


def _hf_rows(hf, batch, fn):
    with torch.no_grad():
        return torch.stack([fn(hf, torch.tensor([ids])) for ids in batch.input_ids])


def test_causal_lm_forward_dict(engine_for):
    engine = engine_for("llama")
    batch = engine.preprocess(TEXTS)
    out = engine.forward(batch)
    ref = _hf_rows(load_hf_model(engine.model_path), batch, lambda m, ids: m(ids).logits[0, -1])
    assert out["logits"].shape == ref.shape
    assert ((out["logits"] - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 1e-4
    probs, ids = ref.softmax(-1).topk(5, dim=-1)
    torch.testing.assert_close(out["probabilities"], probs, atol=1e-5, rtol=1e-4)
    assert out["labels"] == [[engine.tokenizer.decode([t]) for t in row] for row in ids.tolist()]
    assert torch.equal(engine.forward(TEXTS)["logits"], out["logits"])


def test_classifier_forward_and_classify(engine_for):
    engine = engine_for("bertforsequenceclassification")
    hf = load_hf_model(engine.model_path)
    batch = engine.preprocess(TEXTS)
    ref = _hf_rows(hf, batch, lambda m, ids: m(ids).logits[0])
    out = engine.forward(batch)
    torch.testing.assert_close(out["probabilities"], ref.softmax(-1), atol=1e-5, rtol=1e-4)
    assert out["labels"] == [hf.config.id2label[int(i)] for i in ref.argmax(-1)]
    assert engine.classify(TEXTS)["labels"] == out["labels"]
    two = engine.classify(TEXTS, labels=["positive", "negative"])
    expected = ref[:, [2, 0]].softmax(-1)
    torch.testing.assert_close(two["probabilities"], expected, atol=1e-5, rtol=1e-4)
    assert two["label_names"] == ["positive", "negative"]


def test_encoder_embeddings_and_zero_shot(engine_for):
    engine = engine_for("bert")
    hf = load_hf_model(engine.model_path)
    batch = engine.preprocess(TEXTS)
    ref = _hf_rows(hf, batch, lambda m, ids: m(ids).last_hidden_state[0].mean(0))   # mean pooling
    torch.testing.assert_close(engine.forward(batch)["embeddings"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.embed(TEXTS), ref, atol=1e-4, rtol=1e-4)
    labels = ["animals", "greetings", "machine learning"]
    label_ref = _hf_rows(hf, engine.preprocess(labels), lambda m, ids: m(ids).last_hidden_state[0].mean(0))
    sims = F.cosine_similarity(ref[:, None], label_ref[None], dim=-1)
    out = engine.classify(TEXTS, labels=labels)
    torch.testing.assert_close(out["probabilities"], (ZERO_SHOT_SCALE * sims).softmax(-1), atol=1e-4, rtol=1e-4)
    assert out["labels"] == [labels[int(i)] for i in sims.argmax(-1)]


def test_decoder_embeddings_are_normalized_last_token_states(engine_for):
    engine = engine_for("llama")
    batch = engine.preprocess(TEXTS)
    ref = _hf_rows(load_hf_model(engine.model_path), batch, lambda m, ids: m.model(ids).last_hidden_state[0, -1])
    torch.testing.assert_close(engine.embed(TEXTS), F.normalize(ref, dim=-1), atol=1e-5, rtol=1e-4)


def test_default_model_is_all_minilm():
    engine = Engine(device="cpu")
    emb = engine.embed(["这是一个示例文本。", "A short sentence."])
    assert emb.shape == (2, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert engine.max_model_len == 256   # sentence_bert_config.json max_seq_length


def test_kernels_argument_is_in_force_during_forwards(tmp_path_factory, monkeypatch):
    seen = []
    op = lepton_kernels.get_op("rms_norm")
    eager = op.eager
    monkeypatch.setattr(op, "eager", lambda *a, **k: (
        seen.append(lepton_kernels.registry.current_overrides().get("rms_norm")), eager(*a, **k))[1])
    engine = Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", kernels={"rms_norm": "eager"})
    engine.generate("Hello", SamplingParams(temperature=0, max_tokens=2))
    engine.forward("Hello")
    assert seen and set(seen) == {"eager"}
    assert lepton_kernels.registry.current_overrides().get("rms_norm") is None


def test_int8_quantization_stays_close(engine_for, tmp_path_factory):
    path = checkpoint(tmp_path_factory, "llama")
    quantized = Engine(path, device="cpu", quantization="int8")
    ref = engine_for("llama").forward(TEXTS)["logits"]
    logits = quantized.forward(TEXTS)["logits"]
    assert ((logits - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 0.05
    with pytest.raises(ValueError, match="int4.*multiple of 32"):
        Engine(path, device="cpu", quantization="int4")   # intermediate size 344


ENGINE_ARGS = [
    (dict(dtype="int8"), "dtype"), (dict(dtype="float64"), "dtype"), (dict(device="tpu"), "device"),
    (dict(max_model_len=0), "max_model_len"), (dict(max_model_len=10**6), "max_model_len"),
    (dict(block_size=0), "block_size"), (dict(block_size=True), "block_size"),
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(kv_cache_memory=0), "kv_cache_memory"), (dict(kv_cache_memory=4096), "kv_cache_memory"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching"),
    (dict(kernels={"no_such_op": "eager"}), "kernels"), (dict(kernels={"rms_norm": "magic"}), "kernels"),
    (dict(kernels=["rms_norm"]), "kernels"), (dict(seed=-1), "seed"), (dict(quantization="fp3"), "quantization"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
]


@pytest.mark.parametrize("kwargs,field", ENGINE_ARGS, ids=[f"{k}" for k, _ in ENGINE_ARGS])
def test_bad_engine_arguments(tmp_path_factory, kwargs, field):
    kwargs.setdefault("device", "cpu")
    with pytest.raises(ValueError, match=field):
        Engine(checkpoint(tmp_path_factory, "llama"), **kwargs)


def test_cuda_requested_without_cuda(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device"):
        Engine(checkpoint(tmp_path_factory, "llama"), device="cuda")


def test_dtype_the_device_cannot_run(tmp_path_factory, monkeypatch):
    real = F.linear

    def no_half(x, *args, **kwargs):
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return real(x, *args, **kwargs)
    monkeypatch.setattr(F, "linear", no_half)
    with pytest.raises(ValueError, match="dtype float16 cannot run on cpu"):
        Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", dtype="float16")


SAMPLING_ARGS = [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=1.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"),
    (dict(logprobs=-1), "logprobs"), (dict(n=0), "n must"), (dict(seed=-2**63 - 1), "seed"),
    (dict(seed=2**64), "seed"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(ignore_eos="no"), "ignore_eos"),
    (dict(stop=5), "stop"), (dict(stop_token_ids=5), "stop_token_ids"),
]


@pytest.mark.parametrize("kwargs,field", SAMPLING_ARGS, ids=[f"{k}" for k, _ in SAMPLING_ARGS])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts(engine_for):
    engine = engine_for("llama")
    cases = [("", "empty"), ([[]], "empty"), ([], "non-empty"), ([[1, 10**6]], "vocabulary"),
             ([[-1]], "vocabulary"), ([3.5], "must be a string"), (["word " * 300], "max_model_len"),
             ([[5] * engine.max_model_len], "max_model_len")]
    for prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate(prompts, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="sampling_params"):
        engine.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="max_model_len"):
        engine.forward([[5] * (engine.max_model_len + 1)])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.embed([[engine.vocab_size]])
    with pytest.raises(ValueError, match="conversation"):
        engine.chat([{"content": "no role"}])


def test_chat_without_template_and_tasks_the_model_lacks(tmp_path_factory, engine_for):
    gpt2 = Engine(checkpoint(tmp_path_factory, "gpt2"), device="cpu")
    gpt2.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        gpt2.chat([{"role": "user", "content": "Hello"}])
    bert = engine_for("bert")
    with pytest.raises(ValueError, match="causal language model"):
        bert.generate("Hello")
    with pytest.raises(ValueError, match="labels="):
        bert.classify(TEXTS)
    with pytest.raises(ValueError, match="labels"):
        bert.classify(TEXTS, labels="animals")
    with pytest.raises(ValueError, match="not among the model's labels"):
        engine_for("bertforsequenceclassification").classify(TEXTS, labels=["maybe"])


def test_token_id_tuples_are_prompts(engine_for):
    engine = engine_for("llama")
    params = SamplingParams(temperature=0, max_tokens=4)
    as_list = engine.generate([5, 9, 13], params)[0].outputs[0].token_ids
    assert engine.generate((5, 9, 13), params)[0].outputs[0].token_ids == as_list
    assert torch.equal(engine.forward((5, 9, 13))["logits"], engine.forward([5, 9, 13])["logits"])


def test_concurrent_generate_calls_share_one_cache(tmp_path_factory):
    """Threads calling generate on one engine whose cache holds one batch at a time: each call
    gets the tokens it would get alone, and no block is lost."""
    import threading

    from lepton.model_executor.kv_cache import KVCache

    path = checkpoint(tmp_path_factory, "llama")
    probe = Engine(path, device="cpu", max_model_len=64)
    m = probe.model
    per_block = KVCache.bytes_per_block(m.num_layers, 16, m.num_kv_heads, m.head_dim, probe.dtype)
    # Four blocks: one call's two sequences of up to 64 tokens, never two calls at once.
    engine = Engine(path, device="cpu", max_model_len=64, kv_cache_memory=4 * per_block)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [[[5 + i] * 5] * 2 for i in range(3)]
    alone = [[o.outputs[0].token_ids for o in engine.generate(p, params)] for p in prompts]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = [o.outputs[0].token_ids for o in engine.generate(prompts[i], params)]
        except Exception as err:  # surfaced through the assert below
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(3)] == alone
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def test_gpu_profiling_forward_feeds_the_sampler(engine_for, monkeypatch):
    """The profiled peak (GPU cache sizing) covers forward, logits and the sampler's worst path;
    run here with torch.cuda's memory calls stubbed, since this machine has no GPU."""
    from lepton.model_executor import setup as engine_setup

    engine = engine_for("llama")
    for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 123)
    seen = []
    peak = engine.executor.runner.profile_peak_memory(
        24, 16, 40, lambda logits: (seen.append(logits.shape), engine_setup.worst_case_sampling(logits)))
    assert peak == 123 and seen == [(40, engine.vocab_size)]
