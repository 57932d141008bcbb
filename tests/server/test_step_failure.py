"""An engine step that raises fails the requests in flight with a JSON 500 (a stream: an error
event, then [DONE]), and the server serves on; before, the engine loop died and every later
request got 503.

The server is `lepton serve` in a process whose executor raises on any step that holds a
completion prompt containing FAULT: the step fails after the scheduler gave it cache blocks,
as a real forward failure would.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, ServerProcess, assert_error, wait_idle

FAULT = "FAIL-THIS-STEP"
FAULTY_SERVE = f"""
import sys
from lepton.model_executor.executor import InProcessExecutor

FAULT = {FAULT!r}
forward = InProcessExecutor.execute_model

def failing(self, step):
    if any(FAULT in (seq.request.prompt or "") for seq in step.seqs):
        raise RuntimeError("injected forward failure")
    return forward(self, step)

InProcessExecutor.execute_model = failing
from lepton.entrypoints.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def faulty(model_dir, tmp_path_factory):
    proc = ServerProcess(model_dir, ["--max-model-len", "128", "--served-model-name", MODEL_NAME],
                         tmp_path_factory.mktemp("step_failure_logs"))
    assert proc.cmd[1:3] == ["-m", "lepton"]
    proc.cmd[1:3] = ["-c", FAULTY_SERVE]   # the same command line, run by the wrapper above
    with proc:
        yield proc


def complete(server, prompt: str, **fields) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, **fields})


def test_a_failed_step_is_a_json_500_and_the_server_serves_on(faulty):
    reference = complete(faulty, "A healthy prompt")
    assert reference.status_code == 200, reference.text[:300]
    err = assert_error(complete(faulty, f"{FAULT} please"), 500)
    assert "RuntimeError" in err["message"]
    after = complete(faulty, "A healthy prompt")
    assert after.status_code == 200, after.text[:300]
    assert after.json()["choices"][0]["text"] == reference.json()["choices"][0]["text"]
    assert httpx.get(f"{faulty.url}/health", timeout=10).status_code == 200
    wait_idle(faulty.url)   # the failed request's blocks were freed


def test_a_failed_step_ends_a_stream_with_an_error_event(faulty):
    with httpx.stream("POST", f"{faulty.url}/v1/completions", timeout=60,
                      json={"model": MODEL_NAME, "prompt": f"{FAULT} streaming", "max_tokens": 8,
                            "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == 500 and error["message"], error
    assert complete(faulty, "Still serving").status_code == 200
