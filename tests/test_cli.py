"""The ``lepton`` command line against the Engine API it wraps: generate, chat, embed, classify
give what Engine.generate / chat / embed / classify give for the same inputs; bad input ends with
one line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import lepton_kernels
from lepton.entrypoints.cli.main import main
from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams
from tests.engine import checkpoint

COMMANDS = ("serve", "generate", "chat", "embed", "classify", "bench", "demo", "kernels")
PROMPTS = ["Hello world", "The quick brown fox"]


def lepton(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m lepton ARGS`` with bytes out (a reply may hold \\r, which text mode would turn
    into \\n), UTF-8 on both pipes."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "lepton", *args], capture_output=True, env=env,
                          input=None if stdin is None else stdin.encode(), timeout=300)


def run(argv: list[str]) -> int:
    """``main(argv)`` in this process; argparse's usage errors exit, so their code is returned."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(checkpoint(tmp_path_factory, "llama"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(checkpoint(tmp_path_factory, "bert"))


# ---- the command set ----------------------------------------------------------------------------
def test_help_lists_every_command():
    proc = lepton("--help")
    assert proc.returncode == 0
    listed = proc.stdout.decode()
    for command in COMMANDS:
        assert f"    {command} " in listed, command


def test_lepton_kernels_command_lists_every_op():
    out = lepton("kernels").stdout.decode()
    for name in lepton_kernels.list_ops():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert out.count(" eager ") == len(lepton_kernels.list_ops())


def test_commands_other_than_serve_never_import_the_server_stack():
    code = ("import sys; from lepton.entrypoints.cli.main import main; main(['kernels']); "
            "print('LOADED', sorted(m for m in ('fastapi', 'uvicorn', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "LOADED []"


def test_plain_lepton_kernels_never_imports_triton():
    code = ("import sys; from lepton.entrypoints.cli.main import main; main(['kernels']); "
            "print('TRITON', 'triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (which imports triton)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert out.splitlines()[-1] == "TRITON False"


def test_compile_report_flags_need_compile():
    proc = lepton("kernels", "--json")
    assert proc.returncode == 1 and "--json only apply to the compile report: add --compile" in proc.stderr.decode()
    assert proc.stdout == b""


def test_compile_report_lists_its_cases_and_rejects_a_bad_arch():
    listed = lepton("kernels", "--compile", "--list").stdout.decode().splitlines()
    assert any(line.split()[:2] == ["flash_attention", "flash_prefill_causal_d128"] for line in listed)
    proc = lepton("kernels", "--compile", "--arch", "ampere")
    assert proc.returncode == 1 and "--arch: 'ampere' is not a CUDA architecture" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_compile_report_check_fails_on_a_kernel_the_compiler_rejects():
    """Through ``lepton``, from a shell where TRITON_INTERPRET=1 (this test process): the report
    compiles anyway (it is a fresh process) and --check exits 1 naming the kernel."""
    from lepton_kernels.compile.driver import toolchain_problem

    if problem := toolchain_problem():
        pytest.skip(f"this triton install cannot compile for CUDA: {problem}")
    assert os.environ["TRITON_INTERPRET"] == "1"
    proc = lepton("kernels", "--compile", "--arch", "sm_90", "--case", "selftest_bad_dot", "--json",
                  "--check", "--jobs", "1")
    records = json.loads(proc.stdout)
    assert proc.returncode == 1 and [r["kernel"] for r in records] == ["_selftest_bad_dot_kernel"]
    assert records[0]["arch"] == "sm_90" and records[0]["ok"] is False
    assert "check failed: selftest selftest_bad_dot/fp16 _selftest_bad_dot_kernel sm_90: compile error" \
        in proc.stderr.decode()


def test_unknown_command_exits_with_usage():
    proc = lepton("nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr.decode()


# ---- generate -----------------------------------------------------------------------------------
def test_generate_from_arguments_matches_engine_greedy(llama, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run(["generate", "--model", llama, *PROMPTS, "--max-tokens", "8", "--ignore-eos",
                "--device", "cpu", "--output", str(out)]) == 0
    rows = read_jsonl(out)
    ref = Engine(llama, device="cpu").generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8,
                                                                       ignore_eos=True), use_tqdm=False)
    assert [r["prompt"] for r in rows] == PROMPTS
    for row, expected in zip(rows, ref):
        completion = expected.outputs[0]
        assert row["prompt_token_ids"] == expected.prompt_token_ids
        assert row["token_ids"] == completion.token_ids and len(row["token_ids"]) == 8
        assert row["text"] == completion.text and row["finish_reason"] == "length"
    assert "Processed prompts" in capsys.readouterr().err   # the engine's progress bar

    # Without --output: readable text, the prompt followed by its completion.
    assert run(["generate", "--model", llama, *PROMPTS, "--max-tokens", "8", "--ignore-eos"]) == 0
    printed = capsys.readouterr().out
    for prompt, expected in zip(PROMPTS, ref):
        assert f"{prompt}{expected.outputs[0].text}\n  [8 tokens, finish_reason=length]" in printed


def test_generate_from_files_with_sampling_n_and_logprobs(llama, tmp_path):
    text_file, jsonl_file = tmp_path / "prompts.txt", tmp_path / "prompts.jsonl"
    text_file.write_text("Hello world\n\nThe quick brown fox\n", encoding="utf-8")
    jsonl_file.write_text('{"prompt": "Hello world"}\n{"prompt": [5, 6, 7, 8]}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert run(["generate", "--model", llama, "--file", str(text_file), "-o", str(out),
                "--max-tokens", "6"]) == 0
    assert [r["prompt"] for r in read_jsonl(out)] == PROMPTS   # the blank line is skipped

    flags = ["--max-tokens", "6", "--temperature", "1.0", "--top-k", "20", "--n", "2",
             "--logprobs", "2", "--seed", "7"]
    assert run(["generate", "--model", llama, "--file", str(jsonl_file), "-o", str(out), *flags]) == 0
    rows = read_jsonl(out)
    params = SamplingParams(temperature=1.0, top_k=20, n=2, logprobs=2, max_tokens=6)
    ref = Engine(llama, device="cpu", seed=7).generate(["Hello world", [5, 6, 7, 8]], params, use_tqdm=False)
    assert [r["prompt"] for r in rows] == ["Hello world", [5, 6, 7, 8]]
    for row, expected in zip(rows, ref):
        assert [o["index"] for o in row["outputs"]] == [0, 1]
        for got, want in zip(row["outputs"], expected.outputs):
            assert got["token_ids"] == want.token_ids and got["text"] == want.text
            assert got["cumulative_logprob"] == pytest.approx(want.cumulative_logprob)
            for step, token in zip(got["logprobs"], want.token_ids):
                assert str(token) in step and len(step) in (2, 3)   # the sampled token and the top 2


# ---- chat ---------------------------------------------------------------------------------------
def test_chat_streams_replies_equal_to_engine_chat(llama):
    proc = lepton("chat", "--model", llama, "--max-tokens", "12", "--device", "cpu",
                  stdin="Hello\nAgain\n/reset\nHello\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr.decode()
    engine, params = Engine(llama, device="cpu"), SamplingParams(temperature=0, max_tokens=12)
    first = engine.chat([{"role": "user", "content": "Hello"}], params, use_tqdm=False)[0].outputs[0].text
    second = engine.chat([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "Again"}], params, use_tqdm=False)[0].outputs[0].text
    # Turn 2 continues the conversation; /reset starts over, so turn 3 repeats turn 1.
    assert proc.stdout.decode() == f"{first}\n{second}\n{first}\n"
    assert "(conversation reset)" in proc.stderr.decode()


def test_chat_with_system_message_and_template_file(llama, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "[assistant] ", encoding="utf-8")
    proc = lepton("chat", "--model", llama, "--max-tokens", "6", "--system", "Be brief.",
                  "--chat-template", str(template), stdin="Hi\n")
    assert proc.returncode == 0, proc.stderr.decode()
    expected = Engine(llama, device="cpu").chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        SamplingParams(temperature=0, max_tokens=6), chat_template=template.read_text(), use_tqdm=False)
    assert proc.stdout.decode() == expected[0].outputs[0].text + "\n"


def test_chat_fits_replies_to_the_context_and_refuses_a_turn_that_cannot_fit(llama):
    # --max-tokens past the room left is cut to that room; a turn that leaves no room at all is
    # refused by the engine's input processor, and the session goes on without it.
    proc = lepton("chat", "--model", llama, "--max-tokens", "1000", "--ignore-eos", "--max-model-len", "64",
                  "--device", "cpu", stdin="Hi\n" + "hello " * 100 + "\n/reset\nHi\n")
    assert proc.returncode == 0, proc.stderr.decode()
    engine = Engine(llama, device="cpu", max_model_len=64)
    conversation = [{"role": "user", "content": "Hi"}]
    room = 64 - len(engine.input_processor.chat(conversation)[0].token_ids)
    reply = engine.chat(conversation, SamplingParams(temperature=0, max_tokens=room, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert len(reply.token_ids) == room
    assert proc.stdout.decode() == f"{reply.text}\n{reply.text}\n"
    refused = [line for line in proc.stderr.decode().splitlines() if line.startswith("lepton chat: ")]
    assert len(refused) == 1 and refused[0].startswith("lepton chat: the conversation has ")
    assert "max_model_len (64)" in refused[0] and refused[0].endswith("; /reset to start over")


# ---- embed and classify -------------------------------------------------------------------------
def test_embed_matches_engine_embed(bert, tmp_path, capsys):
    texts_file, out = tmp_path / "texts.txt", tmp_path / "emb.jsonl"
    texts_file.write_text("The cat sits on the mat.\n", encoding="utf-8")
    assert run(["embed", "--model", bert, "Hello world", "--file", str(texts_file), "-o", str(out)]) == 0
    rows = read_jsonl(out)
    texts = ["Hello world", "The cat sits on the mat."]
    assert [r["text"] for r in rows] == texts
    expected = Engine(bert, device="cpu").embed(texts)
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in rows]), expected, atol=0, rtol=0)
    assert run(["embed", "--model", bert, "Hello world"]) == 0
    assert f"dim {expected.shape[1]}" in capsys.readouterr().out


@pytest.mark.parametrize("arch, labels", [("bert", "greeting,animal,food"),
                                          ("bertforsequenceclassification", None),
                                          ("bertforsequenceclassification", "positive,negative")])
def test_classify_matches_engine_classify(arch, labels, tmp_path_factory, tmp_path, capsys):
    model, out = str(checkpoint(tmp_path_factory, arch)), tmp_path / "cls.jsonl"
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog."]
    flags = [] if labels is None else ["--labels", labels]
    assert run(["classify", "--model", model, *texts, *flags, "-o", str(out)]) == 0
    rows = read_jsonl(out)
    expected = Engine(model, device="cpu").classify(texts, labels=labels and labels.split(","))
    for row, label, probs in zip(rows, expected["labels"], expected["probabilities"]):
        assert row["label"] == label and list(row["probabilities"]) == expected["label_names"]
        assert list(row["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)
    assert run(["classify", "--model", model, *texts, *flags]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["label", *expected["label_names"]]
    assert [line.split()[-len(expected["label_names"]) - 1] for line in table[1:]] == expected["labels"]


# ---- bad input ----------------------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_INPUTS = {   # argv (MODEL / TMP filled in) -> (exit code, words of the message)
    "missing model": (["generate", "--model", "TMP/missing", "hi"], 1, "does not exist"),
    "no prompts": (["generate", "--model", "LLAMA"], 1, "no prompts"),
    "not an int": (["generate", "--model", "LLAMA", "hi", "--max-tokens", "x"], 2, "--max-tokens"),
    "bad sampling": (["generate", "--model", "LLAMA", "hi", "--temperature", "-1"], 1, "temperature"),
    "bad engine flag": (["generate", "--model", "LLAMA", "hi", "--dtype", "int3"], 1, "dtype"),
    "zero length": (["generate", "--model", "LLAMA", "hi", "--max-model-len", "0"], 2, "--max-model-len"),
    "prompt too long": (["generate", "--model", "LLAMA", "hi", "--max-tokens", "1000"], 1, "max_model_len"),
    "missing file": (["generate", "--model", "LLAMA", "--file", "TMP/none.txt"], 1, "no such file"),
    "bad jsonl": (["generate", "--model", "LLAMA", "--file", "TMP/bad.jsonl"], 1, "not valid JSON"),
    "unwritable output": (["generate", "--model", "LLAMA", "hi", "-o", "TMP/no/dir.jsonl"], 1, "cannot write"),
    "chat on an encoder": (["chat", "--model", "BERT"], 1, "causal language model"),
    "missing template": (["chat", "--model", "LLAMA", "--chat-template", "TMP/none.jinja"], 1, "chat template"),
    "zero-shot without labels": (["classify", "--model", "BERT", "hi"], 1, "--labels"),
    "empty label": (["classify", "--model", "BERT", "hi", "--labels", "a,,b"], 1, "--labels"),
    "unreachable server": (["bench", "--base-url", "http://127.0.0.1:PORT", "--num-prompts", "1"], 1,
                           "cannot reach the server"),
    "bad rate": (["bench", "--request-rate", "0"], 2, "--request-rate"),
    "bad percentile": (["bench", "--metric-percentiles", "150"], 1, "--metric-percentiles"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_an_exit_code(case, llama, bert, tmp_path, capsys):
    argv, code, words = BAD_INPUTS[case]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    fill = {"LLAMA": llama, "BERT": bert, "TMP": str(tmp_path), "PORT": str(closed_port())}
    for key, value in fill.items():
        argv = [arg.replace(key, value) for arg in argv]
    assert run(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lepton {argv[0]}: error: "), err
    assert words in err


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    proc = lepton("generate", "--model", str(tmp_path / "missing"), "hi")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip() == f"lepton generate: error: model folder '{tmp_path / 'missing'}' does not exist"
