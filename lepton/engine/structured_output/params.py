"""What a request may ask its output to follow: vLLM's ``StructuredOutputsParams``.

Exactly one of:
    json         a JSON schema (dict, or its JSON text): the output is one JSON value valid under it
    regex        the output matches the regular expression as a whole
    choice       the output is one of these strings, exactly
    grammar      an EBNF grammar (xgrammar's / llama.cpp's GBNF dialect, root rule ``root``)
    json_object  True: the output is one JSON object, any keys and values

``any_whitespace`` (JSON only): False (the default) allows at most JSON_MAX_WHITESPACE whitespace
characters between two tokens of the JSON text, so a model cannot run out its max_tokens on
blank space; True allows any amount, as json.loads does.

This module imports nothing from lepton and no grammar engine: SamplingParams holds one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

JSON_MAX_WHITESPACE = 16   # per gap: room for pretty-printed JSON seven levels deep
KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as err:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {err}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema (an object), "
                                 f"got {type(schema).__name__}")
            object.__setattr__(self, "json", schema)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r:.80}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice \
                    or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r:.80}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")
        if not isinstance(self.any_whitespace, bool):
            raise ValueError(f"structured_outputs.any_whitespace must be true or false, got {self.any_whitespace!r}")

    @classmethod
    def of(cls, value) -> StructuredOutputsParams:
        """A StructuredOutputsParams, or a dict of its fields (a request body's)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(value).__name__}")
        unknown = set(value) - {*KINDS, "any_whitespace"}
        if unknown:
            raise ValueError(f"structured_outputs: unknown fields {sorted(unknown)}; known: "
                             f"{', '.join(KINDS)}, any_whitespace")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple:
        """What the compiled grammar depends on: equal keys share one compilation. A schema
        keeps its key order (the grammar emits properties in that order)."""
        kind = self.kind
        if kind == "json":
            return kind, json.dumps(self.json, ensure_ascii=False), self.any_whitespace
        if kind == "json_object":
            return kind, "", self.any_whitespace
        return kind, getattr(self, kind)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, StructuredOutputsParams) and self.key == other.key
