"""Server-sent events stay one line for clients that split lines as str.splitlines() does
(httpx's aiter_lines): the Unicode line breaks JSON leaves raw under ensure_ascii=False are
escaped, and the event still decodes to the same text."""

import json

import pytest

from lepton.entrypoints.server.responses import event_json, sse

# Every character str.splitlines() breaks at, and text around them as a tokenizer might emit it.
BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def client_lines(stream: str) -> list[str]:
    """Lines as httpx's aiter_lines yields them: its decoder splits with str.splitlines()."""
    return stream.splitlines()


@pytest.mark.parametrize("brk", BREAKS, ids=[f"U+{ord(b[0]):04X}{'+LF' if len(b) > 1 else ''}" for b in BREAKS])
def test_sse_event_is_one_line_for_a_splitlines_client(brk):
    payload = {"choices": [{"index": 0, "text": f"before{brk}after é 日本"}]}
    lines = client_lines(sse(payload))
    assert lines == [lines[0], ""], lines   # the data line, then the blank line ending the event
    assert lines[0].startswith("data: ")
    assert json.loads(lines[0][6:]) == payload
    assert "é 日本" in lines[0]   # UTF-8 stays as it is; only the line breaks are escaped


def test_event_json_matches_json_dumps_elsewhere():
    payload = {"a": "x\u2028y", "b": [1, 2.5, None, True], "c": "plain"}
    text = event_json(payload)
    assert json.loads(text) == payload
    assert text == json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace(
        "\u2028", "\\u2028")
