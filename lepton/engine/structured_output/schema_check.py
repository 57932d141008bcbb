"""JSON-schema keywords the grammar enforces; any other keyword is refused, never ignored.

xgrammar turns a schema into a grammar and silently drops what it cannot express (uniqueItems,
multipleOf, if/then/else, ...). An answer from such a grammar can break the schema the client
gave, so ``check_schema`` refuses those schemas instead, naming the keyword and where it is.
"""

from __future__ import annotations

# Enforced by the grammar.
_ENFORCED = frozenset({
    "type", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "minProperties", "maxProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
# No effect on which values are valid.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
})
STRING_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def check_schema(schema, path: str = "#") -> None:
    """ValueError naming the first keyword at ``path`` (a JSON pointer) that the grammar would not
    enforce, or a malformed one."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema: the schema at {path} must be an object, got {type(schema).__name__}")
    for key in schema:
        if key not in _ENFORCED and key not in _ANNOTATIONS:
            raise ValueError(f"json_schema: the keyword {key!r} at {path} is not supported "
                             "(structured outputs cannot enforce it)")
    types = schema.get("type")
    for t in [types] if isinstance(types, str) else types if isinstance(types, list) else []:
        if t not in _TYPES:
            raise ValueError(f"json_schema: unknown type {t!r} at {path}")
    if "format" in schema and schema["format"] not in STRING_FORMATS:
        raise ValueError(f"json_schema: the string format {schema['format']!r} at {path} is not supported; "
                         f"supported: {', '.join(sorted(STRING_FORMATS))}")
    if ("pattern" in schema or "format" in schema) and ("minLength" in schema or "maxLength" in schema):
        raise ValueError(f"json_schema: {path} combines pattern/format with minLength/maxLength, which "
                         "structured outputs cannot enforce together")
    if "$ref" in schema and not str(schema["$ref"]).startswith("#"):
        raise ValueError(f"json_schema: only local references (#/...) are supported, got {schema['$ref']!r} at {path}")
    for key in ("properties", "$defs", "definitions"):
        for name, sub in _mapping(schema, key, path).items():
            check_schema(sub, f"{path}/{key}/{name}")
    for key in ("additionalProperties", "items"):
        if key in schema and not isinstance(schema[key], bool):
            check_schema(schema[key], f"{path}/{key}")
    for key in ("anyOf", "prefixItems"):
        if key in schema:
            if not isinstance(schema[key], list):
                raise ValueError(f"json_schema: {key} at {path} must be a list of schemas")
            for i, sub in enumerate(schema[key]):
                check_schema(sub, f"{path}/{key}/{i}")


def _mapping(schema: dict, key: str, path: str) -> dict:
    value = schema.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"json_schema: {key} at {path} must be an object")
    return value
