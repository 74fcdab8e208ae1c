"""The OpenAPI description of ``loramux serve``'s bodies: request schemas and the error shape.

The routes parse their JSON bodies themselves (so that every refusal is a 400 in OpenAI's
error shape, naming the field), so FastAPI cannot infer their schemas; these JSON schemas are
published in ``/openapi.json`` through ``openapi_extra`` and ``responses`` instead. They
describe what the server accepts: a body outside them is answered 400 (never 5xx), and
fields they do not list are ignored unless :mod:`loramux.server.bodies` refuses them by name.
"""

from __future__ import annotations

from typing import Any

from loramux.token_routing import CALIBRATIONS, MAX_K, ROUTING_MODES

NUMBER = {"type": "number"}
STRINGS = {"type": "array", "items": {"type": "string"}}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

LORA_ENTRIES = {
    "type": "array",
    "items": {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer", "minimum": 0}, "scale": NUMBER}},
}

ROUTED_MIX = {
    "description": "per-token routing among every loaded adapter (temperature: Arrow only, null for spectr and logo-token; "
    "calibration: logo-token only, none, spectral or frobenius)",
    "type": "object",
    "required": ["mode"],
    "additionalProperties": False,
    "properties": {
        "mode": {"type": "string", "enum": list(ROUTING_MODES)},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
        "temperature": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "calibration": {"type": ["string", "null"], "enum": [*CALIBRATIONS, None]},
    },
}

MIX = {
    "description": '{adapter name: weight}, "name=w,name=w", a routing mode "arrow[:k=3,T=1]", "spectr[:k=4]" or '
    '"logo-token[:k=3,cal=none]", or {"mode": "arrow", "k": 3, "temperature": 1.0}',
    "oneOf": [{"type": "object", "additionalProperties": NUMBER}, ROUTED_MIX, {"type": "string"}],
}

SAMPLING: dict[str, Any] = {
    "model": {
        "type": "string",
        "description": 'base model id, an adapter, a named mix, "auto", or a routing mode ("arrow", "arrow:k=3,T=1", "spectr")',
    },
    "mix": MIX,
    "lora": LORA_ENTRIES,
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "typical_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "repeat_penalty": {"type": "number", "exclusiveMinimum": 0},
    "frequency_penalty": NUMBER,
    "presence_penalty": NUMBER,
    "seed": {"type": "integer"},
    "logit_bias": {"type": "object", "additionalProperties": NUMBER, "description": "{token id: bias}"},
    "stop": {"oneOf": [{"type": "string"}, STRINGS]},
    "grammar": {"type": "string", "description": "GBNF (llama.cpp's grammar format) with a rule 'root'"},
    "json_schema": {"type": "object", "description": "llama-server's field: a JSON schema the answer validates against"},
    "response_format": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "schema": {"type": "object"}, "strict": {"type": "boolean"}},
            },
        },
    },
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": "integer", "minimum": 1, "maximum": 16, "description": "choices, decoded together from one reading of the prompt"},
    "n_predict": {"type": "integer", "minimum": -1, "description": "llama-server's max_tokens (-1: no limit)"},
    "n_probs": {
        "type": "integer",
        "minimum": 0,
        "maximum": 20,
        "description": "llama-server's: log-probabilities with that many alternatives",
    },
    "user": {"type": "string"},
}

COMPLETION = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
        **SAMPLING,
    },
}

TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object", "description": "a JSON schema of the arguments"},
            },
        },
    },
}
TOOL_CALL = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string", "description": "a JSON object, as text"}},
        },
    },
}

MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "tool_calls": {"type": "array", "items": TOOL_CALL},
        "tool_call_id": {"type": "string"},
        "name": {"type": "string"},
        "content": {
            "oneOf": [
                {"type": "string"},
                {"type": "null"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                    },
                },
            ]
        },
    },
}

CHAT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "tools": {"type": "array", "items": TOOL},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "add_generation_prompt": {"type": "boolean"},
        "continue_final_message": {"type": "boolean", "description": "continue the last (assistant) message"},
        "tool_choice": {
            "description": 'default "auto" with tools; "required" or a named function: the answer is a call (a grammar); see docs/serve.md',
            "oneOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["type", "function"],
                    "properties": {
                        "type": {"enum": ["function"]},
                        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                    },
                },
            ],
        },
        **SAMPLING,
    },
}

ADAPTER_LOAD = {
    "type": "object",
    "required": ["path"],
    "properties": {"path": {"type": "string", "description": "a GGUF file or PEFT folder inside --adapters"}, "name": {"type": "string"}},
}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``schema`` (the route parses it itself)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses`` entries for these error statuses, all in OpenAI's error shape."""
    return {s: {"description": "an error in OpenAI's shape", "content": {"application/json": {"schema": ERROR}}} for s in statuses}


# Every route may answer these: a bad body or field (400), a missing --api-key (401).
COMMON_ERRORS = (400, 401)
GENERATION = {"openapi_extra": json_body(COMPLETION), "responses": errors(*COMMON_ERRORS, 404, 429)}
CHAT_GENERATION = {"openapi_extra": json_body(CHAT), "responses": errors(*COMMON_ERRORS, 404, 429)}
LOAD = {"openapi_extra": json_body(ADAPTER_LOAD), "responses": errors(*COMMON_ERRORS, 403, 404)}
SCALES = {"openapi_extra": json_body(LORA_ENTRIES), "responses": errors(*COMMON_ERRORS)}

__all__ = [
    "ADAPTER_LOAD",
    "CHAT",
    "CHAT_GENERATION",
    "COMPLETION",
    "ERROR",
    "GENERATION",
    "LOAD",
    "LORA_ENTRIES",
    "MIX",
    "ROUTED_MIX",
    "SCALES",
    "TOOL",
    "TOOL_CALL",
    "errors",
    "json_body",
]
