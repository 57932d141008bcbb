"""Fuzzing with schemathesis from the server's own OpenAPI schema (GET /openapi.json): valid and
invalid bodies for every operation; no 5xx, no 422, no hang (each call has a timeout), every 4xx
an OpenAI error body; the server is healthy and idle afterwards.

schemathesis' pytest plugin (``schemathesis.pytest.from_fixture``) does not run under pytest 9
(it sets ``request.node._nodeid``), so each operation's Hypothesis test is built here from
``APIOperation.as_strategy``. A server of its own, with small limits, keeps the cost bounded and
the shared server undisturbed.
"""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import ServerProcess, assert_error, auth, wait_idle

pytest.importorskip("schemathesis", reason="the fuzz tests need schemathesis (the dev extra)")

KEY = "sk-fuzz"
NAME = "fuzz-llama"
MAX_EXAMPLES = 50
CALL_TIMEOUT = 30.0
OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings", "POST /tokenize",
              "POST /detokenize", "GET /v1/models"]


@pytest.fixture(scope="module")
def fuzz_server(model_dir, tmp_path_factory):
    args = ["--served-model-name", NAME, "--api-key", KEY, "--max-model-len", "64", "--max-num-seqs", "8",
            "--max-prompts", "4", "--max-n", "4", "--metrics-public"]
    with ServerProcess(model_dir, args, tmp_path_factory.mktemp("fuzz_logs")) as proc:
        yield proc


@pytest.fixture(scope="module")
def schema(fuzz_server):
    import schemathesis

    resp = httpx.get(f"{fuzz_server.url}/openapi.json", headers=auth(KEY), timeout=30)
    assert resp.status_code == 200, resp.text[:300]
    config = schemathesis.Config.from_dict({"base-url": fuzz_server.url, "headers": auth(KEY)})
    return schemathesis.openapi.from_dict(resp.json(), config=config)


def test_schema_lists_the_api(schema):
    labels = {result.ok().label for result in schema.get_all_operations()}
    missing = [op for op in OPERATIONS if op not in labels]
    assert not missing, f"/openapi.json lacks {missing}; it has {sorted(labels)}"


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz(schema, fuzz_server, model_dir, label):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in /openapi.json"
    def pin_model(pair):
        """Half the bodies name the served model, so that they get past the 404 and run."""
        case, pin = pair
        if pin and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = NAME
        return case

    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    strategy = st.tuples(cases, st.booleans()).map(pin_model)
    seen: dict[int, int] = {}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def run(case):
        import requests

        try:
            resp = case.call(timeout=CALL_TIMEOUT)
        except requests.Timeout:
            pytest.fail(f"{label}: no answer within {CALL_TIMEOUT:.0f} s to body {case.body!r:.300}")
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        detail = f"{label} -> {resp.status_code} for body {case.body!r:.300}: {resp.text[:300]}"
        assert resp.status_code < 500, detail
        assert resp.status_code != 422, detail
        if resp.status_code >= 400:
            assert_error(httpx.Response(resp.status_code, content=resp.content), resp.status_code,
                         forbidden=(str(model_dir),))

    run()
    print(f"{label}: {sorted(seen.items())}")
    assert seen, "no case ran"


def test_healthy_and_idle_after_fuzzing(fuzz_server):
    assert httpx.get(f"{fuzz_server.url}/health", timeout=30).status_code == 200
    resp = httpx.post(f"{fuzz_server.url}/v1/completions", headers=auth(KEY), timeout=60,
                      json={"model": NAME, "prompt": "Hello world", "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200, resp.text[:300]
    wait_idle(fuzz_server.url, timeout=10)
