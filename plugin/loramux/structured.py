"""Structured outputs: an OpenAI ``response_format`` (or llama-server's ``json_schema``) as a grammar.

The grammar is GBNF for llama.cpp's grammar sampler, which runs in each request's own sampler
chain, so constrained and free requests share every decode. The JSON-schema → GBNF conversion is
llama-cpp-python's (``llama_cpp.llama_grammar.json_schema_to_gbnf``, a port of llama.cpp's
``json_schema_to_grammar``), and free JSON is its ``JSON_GBNF``: nothing here writes grammar.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from loramux.errors import RequestError


def schema_grammar(schema: Any, *, param: str) -> str:
    """GBNF of the JSON values that validate against JSON schema ``schema`` (RequestError naming ``param``)."""
    from llama_cpp import llama_grammar

    if not isinstance(schema, Mapping):
        raise RequestError(f"{param}: a JSON schema is an object, got {type(schema).__name__}", param=param)
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises plain exceptions for what it cannot express
        raise RequestError(f"{param}: llama.cpp's JSON-schema converter cannot express this schema: {exc}", param=param) from None


def grammar_for(response_format: Any) -> str | None:
    """GBNF for OpenAI's ``response_format``: ``{"type": "text"}`` → None (free text);
    ``{"type": "json_object"}`` → any JSON object (or ``"schema"``'s, llama-cpp-python's extension);
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` → JSON valid against
    ``schema`` (the grammar enforces it whatever ``strict`` says)."""
    from llama_cpp import llama_grammar

    param = "response_format"
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return llama_grammar.JSON_GBNF if schema is None else schema_grammar(schema, param=param)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise RequestError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}", param=param)
        return schema_grammar(spec["schema"], param=param)
    raise RequestError(f"response_format type must be text, json_object or json_schema, got {kind!r}", param=param)


__all__ = ["grammar_for", "schema_grammar"]
