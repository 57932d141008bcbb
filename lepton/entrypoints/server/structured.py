"""The request fields that ask for structured outputs, read into one StructuredOutputsParams.

    response_format    OpenAI's: {"type": "text"} (nothing), {"type": "json_object"},
                       {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    structured_outputs vLLM's: {"json" | "regex" | "choice" | "grammar" | "json_object": ...,
                       "any_whitespace": bool}
    guided_json, guided_regex, guided_choice, guided_grammar   vLLM's older names

At most one of them may ask for something. The spec is parsed here (engine/structured_output/
grammar.py), so an invalid schema, regex or grammar, or a JSON-schema feature the grammar could
not enforce, is a 400 that names the field and the problem, before anything is queued.
"""

from __future__ import annotations

from typing import Any

from lepton.engine.structured_output.grammar import build_grammar
from lepton.engine.structured_output.params import StructuredOutputsParams
from lepton.entrypoints.server.errors import APIError

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(req: Any) -> StructuredOutputsParams | None:
    """The request's structured-outputs spec (None: it asks for none); APIError 400 naming the field."""
    asked = []
    if req.response_format not in (None, {}) and req.response_format.get("type") != "text":
        asked.append(("response_format", lambda: _response_format(req.response_format)))
    if req.structured_outputs:
        asked.append(("structured_outputs", lambda: StructuredOutputsParams.of(req.structured_outputs)))
    for name, kind in _GUIDED.items():
        value = getattr(req, name, None)
        if value not in (None, [], ""):
            asked.append((name, lambda kind=kind, value=value: StructuredOutputsParams(**{kind: value})))
    if not asked:
        return None
    if len(asked) > 1:
        raise APIError(400, f"{' and '.join(n for n, _ in asked)} each ask for structured outputs; "
                            "give one of them", param=asked[1][0])
    name, make = asked[0]
    try:
        params = make()
        build_grammar(params)
    except (ValueError, TypeError) as err:
        raise APIError(400, f"{name}: {err}", param=name) from None
    return params


def _response_format(value: dict) -> StructuredOutputsParams:
    kind = value.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError("json_schema.schema must be a JSON schema object")
    return StructuredOutputsParams(json=spec["schema"])
