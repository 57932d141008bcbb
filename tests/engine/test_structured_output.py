"""Structured outputs (engine/structured_output/) on a tiny random Llama: whatever the random
weights propose, the grammar must hold.

The oracle is independent of the engine: every answer that finishes with "stop" must parse with
json.loads and validate with jsonschema, a choice answer must be one of the choices, a regex
answer must match with Python's re.fullmatch. This holds greedy and sampled, in mixed batches
(whose unconstrained rows must come out exactly as when run alone), with n > 1, under
preemption, with prefix caching and when streamed.
"""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest
import torch

from lepton.engine.engine import Engine
from lepton.engine.structured_output.bitmask import apply_token_bitmask, unpack_bitmask
from lepton.engine.structured_output.grammar import GrammarCompiler
from lepton.engine.structured_output.params import StructuredOutputsParams
from lepton.sampling_params import RequestOutputKind, SamplingParams
from tests.engine import checkpoint

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]}
NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "minItems": 1, "maxItems": 3}},
        "required": ["id", "roles"]},
    "active": {"type": "boolean"}}, "required": ["user", "active"]}
POINTS = {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
    "x": {"type": "number", "minimum": -1, "maximum": 1},
    "tag": {"enum": ["a", "b", None]}}, "required": ["x"]}}
TAGGED = {"type": "object", "properties": {
    "kind": {"const": "point"},
    "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]},
    "label": {"type": "string", "pattern": "[a-z]{1,6}"}}, "required": ["kind", "value", "label"]}
SCHEMAS = [PERSON, NESTED, POINTS, TAGGED]
PROMPTS = ["Hello", "Give me JSON:", "The quick brown fox", "1 2 3", "A user record", "Tell me"]
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return checkpoint(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def engine(path):
    return Engine(path, device="cpu", max_model_len=256)


def json_params(schema, temperature: float, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, seed=kwargs.pop("seed", None),
                          structured_outputs={"json": schema}, **kwargs)


def assert_valid(completions, schema) -> int:
    """Every completion that stopped validates; returns how many stopped."""
    stopped = 0
    for c in completions:
        assert c.finish_reason in ("stop", "length"), c.finish_reason
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
            stopped += 1
    return stopped


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "nested", "points", "tagged"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_validate_in_mixed_batches(engine, schema, temperature):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in engine.generate(PROMPTS[:2], plain, use_tqdm=False)]
    params = [json_params(schema, temperature, seed=i) for i in range(len(PROMPTS))]
    outs = engine.generate(PROMPTS + PROMPTS[:2], params + [plain, plain], use_tqdm=False)
    completions = [o.outputs[0] for o in outs[:len(PROMPTS)]]
    stopped = assert_valid(completions, schema)
    assert stopped >= len(PROMPTS) - 1   # most finish well before max_tokens
    assert [o.outputs[0].token_ids for o in outs[len(PROMPTS):]] == alone   # unconstrained rows untouched


def test_many_sampled_answers_validate(engine):
    params = [json_params(SCHEMAS[i % 4], 1.0, seed=100 + i) for i in range(24)]
    outs = engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(24)], params, use_tqdm=False)
    stopped = sum(assert_valid([o.outputs[0]], SCHEMAS[i % 4]) for i, o in enumerate(outs))
    assert stopped >= 20


def test_n_samples_each_follow_their_own_matcher(engine):
    out = engine.generate("Hello", json_params(NESTED, 1.0, n=4, seed=7), use_tqdm=False)[0]
    assert len(out.outputs) == 4
    assert_valid(out.outputs, NESTED)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_preemption_keeps_answers_valid_and_unchanged(path, engine):
    params = [json_params(SCHEMAS[i % 4], 0.0) for i in range(8)]
    prompts = [PROMPTS[i % len(PROMPTS)] * 3 for i in range(8)]
    reference = engine.generate(prompts, params, use_tqdm=False)
    per_token = 2 * 2 * 2 * 64 * 4   # K+V, 2 layers, 2 kv heads, head_dim 64, float32
    tiny = Engine(path, device="cpu", max_model_len=256, block_size=4, kv_cache_memory=per_token * 256)
    outs = tiny.generate(prompts, params, use_tqdm=False)
    assert tiny.stats().num_preemptions > 0
    for i, (out, ref) in enumerate(zip(outs, reference)):
        assert_valid(out.outputs, SCHEMAS[i % 4])
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_prefix_cache_hit_changes_nothing(engine):
    params = json_params(PERSON, 0.0)
    prompt = "A long shared prompt for the prefix cache, long enough to fill blocks"
    first = engine.generate(prompt, params, use_tqdm=False)[0]
    second = engine.generate(prompt, params, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_valid(second.outputs, PERSON)


def test_streamed_deltas_add_up_to_a_valid_answer(engine):
    params = json_params(NESTED, 1.0, seed=3, output_kind=RequestOutputKind.DELTA)
    pieces, final = [], None
    for out in engine.stream("Hello", params):
        pieces.append(out.outputs[0].text)
        final = out
    assert final.finished and len(pieces) > 3
    if final.outputs[0].finish_reason == "stop":
        jsonschema.validate(json.loads("".join(pieces)), NESTED)


def test_cut_off_answer_finishes_with_length(engine):
    out = engine.generate("Hello", SamplingParams(temperature=0, max_tokens=3,
                                                  structured_outputs={"json": NESTED}), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    with pytest.raises(ValueError):
        json.loads(out.outputs[0].text)


def test_stop_string_ends_a_constrained_answer(engine):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=['"age"'], structured_outputs={"json": PERSON})
    completion = engine.generate("Hello", params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == '"age"'
    assert completion.text.lstrip().startswith('{') and '"age"' not in completion.text


def test_choice_answers_are_one_of_the_choices(engine):
    choices = ["yes", "no", "maybe so", "it depends"]
    params = [SamplingParams(temperature=t, max_tokens=20, seed=i, structured_outputs={"choice": choices})
              for i, t in enumerate([0.0, 1.0] * 6)]
    outs = engine.generate([PROMPTS[i % len(PROMPTS)] for i in range(12)], params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text in choices


@pytest.mark.parametrize("regex", [r"[a-c]{2,5}-\d{3}", r"(cat|dog)s? \d+", r"[A-Z][a-z]{0,4}@x\.org"])
def test_regex_answers_match(engine, regex):
    params = [SamplingParams(temperature=1.0, max_tokens=40, seed=i, structured_outputs={"regex": regex})
              for i in range(8)]
    outs = engine.generate(["Hello"] * 8, params, use_tqdm=False)
    finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(finished) >= 6
    assert all(re.fullmatch(regex, c.text) for c in finished)


def test_ebnf_grammar_and_json_object(engine):
    grammar = 'root ::= "(" num (("+" | "*") num)* ")"\nnum ::= [1-9] [0-9]?'
    params = [SamplingParams(temperature=1.0, max_tokens=60, seed=i, structured_outputs={"grammar": grammar})
              for i in range(6)]
    for out in engine.generate(["Sum:"] * 6, params, use_tqdm=False):
        if out.outputs[0].finish_reason == "stop":
            assert re.fullmatch(r"\((?:[1-9]\d?)(?:[+*][1-9]\d?)*\)", out.outputs[0].text)
    params = [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=i, structured_outputs={"json_object": True})
              for i in range(6)]
    outs = engine.generate(["Any JSON object:"] * 6, params, use_tqdm=False)
    for out in outs:
        if out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(out.outputs[0].text), dict)


def test_whitespace_is_bounded_unless_any_is_asked(engine):
    ws = re.compile(r"\s{17,}")
    params = [json_params(PERSON, 1.0, seed=i) for i in range(8)]
    for out in engine.generate(["Hello"] * 8, params, use_tqdm=False):
        assert not ws.search(re.sub(r'"(?:[^"\\]|\\.)*"', '""', out.outputs[0].text))
    loose = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=1,
                           structured_outputs={"json": PERSON, "any_whitespace": True})
    assert_valid(engine.generate("Hello", loose, use_tqdm=False)[0].outputs, PERSON)


@pytest.mark.parametrize("spec, message", [
    ({"regex": "[a-"}, "invalid regex"),
    ({"grammar": "root ::= foo"}, "invalid grammar"),
    ({"json": {"type": "nonsense"}}, "unknown type"),
    ({"json": {"type": "array", "uniqueItems": True}}, "'uniqueItems' at #"),
    ({"json": {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 3}}}},
     "'multipleOf' at #/properties/a"),
    ({"json": {"type": "string", "format": "color"}}, "format 'color'"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"choice": []}, "choice"),
])
def test_bad_specs_are_refused_before_queueing(engine, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.generate("Hello", SamplingParams(max_tokens=5, structured_outputs=spec), use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_grammars_compile_once_per_spec(engine):
    compiler = engine.core.structured.compiler
    a = StructuredOutputsParams(json=dict(PERSON))
    b = StructuredOutputsParams(json=json.dumps(PERSON))
    assert compiler.submit(a) is compiler.submit(b)
    assert compiler.submit(a) is not compiler.submit(StructuredOutputsParams(json=PERSON, any_whitespace=True))


def test_a_compiling_grammar_does_not_hold_up_the_batch(path, monkeypatch):
    eng = Engine(path, device="cpu", max_model_len=256)
    release = threading.Event()
    compile_grammar = GrammarCompiler._compile

    def slow(self, params):
        release.wait(30)
        return compile_grammar(self, params)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow)
    eng.add_request("json", "Hello", json_params(PERSON, 0.0))
    eng.add_request("dropped", "Hello", json_params(PERSON, 0.0))
    eng.add_request("plain", "Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert eng.abort("dropped")[0].outputs[0].finish_reason == "abort"
    finished = {}
    while "plain" not in finished:
        for out in eng.step():
            finished[out.request_id] = out if out.finished else None
    assert "json" not in finished and eng.stats().num_waiting == 1   # still waiting for its grammar
    release.set()
    deadline = time.monotonic() + 60
    while eng.has_unfinished_requests() and time.monotonic() < deadline:
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert_valid(finished["json"].outputs, PERSON)


def test_bitmask_unpacks_bit_by_bit():
    g = torch.Generator().manual_seed(0)
    vocab = 77
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 3), generator=g, dtype=torch.int64).to(torch.int32)
    allowed = unpack_bitmask(bitmask, vocab)
    words = bitmask.tolist()
    expected = [[t < 96 and bool((words[r][t // 32] & 0xFFFFFFFF) >> (t % 32) & 1) for t in range(vocab)]
                for r in range(3)]
    assert allowed.tolist() == expected
    z = torch.randn(5, vocab, generator=g)
    before = z.clone()
    apply_token_bitmask(z, (bitmask, torch.tensor([0, 2, 4])))
    assert torch.equal(z[[1, 3]], before[[1, 3]])
    for i, r in enumerate([0, 2, 4]):
        assert torch.equal(z[r] == float("-inf"), ~allowed[i])
    wide = torch.randn(2, 100, generator=g)   # logits wider than the mask: the rest is forbidden
    apply_token_bitmask(wide, (bitmask[:2], torch.tensor([0, 1])))
    assert bool((wide[:, 96:] == float("-inf")).all())
