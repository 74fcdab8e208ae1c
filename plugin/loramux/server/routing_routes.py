"""``POST /v1/routing/tokens``: which adapter each token of a prompt and its answer chose under a routed mix.

The body is a chat (``messages``) or completion (``prompt``) request as ``/v1/chat/completions`` or
``/v1/completions`` takes it, with ``model`` / ``mix`` naming a per-token routing mode (``arrow``,
``spectr:k=2``, ...), plus ``answer``: the text the model answered. The request goes through the
same parsing (:mod:`loramux.server.bodies`) and mix selection (:class:`~loramux.server.selection.MixSelector`)
as a generation; the prompt's tokens (chat template applied) and the answer's tokens are then
teacher-forced as one sequence under the routed mix with the native routing record on
(:meth:`loramux.AdapterPool.token_choices`), off the event loop. A fixed mix routes no token: 400.

The answer, per token: its text (``piece``), whether it is the prompt's or the answer's, the adapter
with the largest share and every adapter's share (its routing weight averaged over the adapted base
weights, or over those of the kinds ``weights`` names, e.g. ``["attn_q"]``; a token's shares sum to 1). This is the record of a teacher-forced pass over the answer's
text re-tokenized, not of the decode that sampled it; for a greedy answer the two route alike up to
batch rounding (docs/playground.md).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from loramux.errors import LoramuxError
from loramux.server import schema
from loramux.server.bodies import text_field
from loramux.server.errors import APIError, from_loramux
from loramux.server.openai_routes import json_body, parse_and_select

router = APIRouter()

BODY = {
    "type": "object",
    "description": "a chat (messages) or completion (prompt) request naming a per-token routing mode in model or mix, plus answer",
    "properties": {
        "messages": schema.CHAT["properties"]["messages"],
        "prompt": schema.COMPLETION["properties"]["prompt"],
        "model": schema.SAMPLING["model"],
        "mix": schema.MIX,
        "answer": {"type": "string", "description": "the answer's text, teacher-forced after the prompt (empty: the prompt alone)"},
        "weights": {
            "type": ["array", "null"],
            "items": {"type": "string"},
            "description": 'the kinds of base weights the shares average over ("attn_q", "ffn_up", ...; the answer\'s "kinds" '
            "lists those that routed); null: all of them",
        },
    },
}
ANSWER = {
    "type": "object",
    "required": ["object", "mix", "mix_source", "adapters", "n_prompt", "kinds", "weights", "tokens"],
    "properties": {
        "object": {"enum": ["routing.tokens"]},
        "mix": schema.ROUTED_MIX,
        "mix_source": {"type": "string"},
        "adapters": schema.STRINGS,
        "n_prompt": {"type": "integer", "description": "the first n_prompt tokens are the prompt's (chat template applied)"},
        "kinds": {**schema.STRINGS, "description": "the kinds of base weights that routed (what weights may name)"},
        "weights": {"type": ["array", "null"], "items": {"type": "string"}, "description": "the kinds the shares average over"},
        "tokens": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "piece", "part", "adapter", "shares"],
                "properties": {
                    "id": {"type": "integer"},
                    "piece": {"type": "string"},
                    "part": {"enum": ["prompt", "answer"]},
                    "adapter": {"type": ["string", "null"], "description": "the adapter with the largest share (null: nothing routed)"},
                    "shares": {"type": "object", "additionalProperties": schema.NUMBER, "description": "{adapter: share}, summing to 1"},
                },
            },
        },
    },
}
TOKEN_ROUTING = {
    "openapi_extra": schema.json_body(BODY),
    "responses": {200: {"description": "per token: the adapter it chose", "content": {"application/json": {"schema": ANSWER}}}}
    | schema.errors(*schema.COMMON_ERRORS, 404),
}
SHARE_DIGITS = 4  # shares are rounded for the wire (a token's shares still sum to 1 within 1e-4)


@router.post("/v1/routing/tokens", **TOKEN_ROUTING)
async def routing_tokens(request: Request) -> dict[str, Any]:
    """Per token of prompt + answer: the adapter it chose and every adapter's share (see the module docstring)."""
    state = request.app.state.loramux
    body = await json_body(request)
    answer = text_field(body.get("answer", ""), "answer")
    weights = _weight_kinds(body.get("weights"))
    parsed, selection = await parse_and_select(request, body, chat="messages" in body)
    if selection.mix.token_routing is None:
        param = "mix" if body.get("mix") is not None else "model"
        raise APIError(
            400,
            f"{param}: the mix {selection.mix.to_json()!r} ({selection.source}) is fixed and routes no token; "
            'name a per-token routing mode, e.g. "model": "arrow" or "mix": "spectr:k=2"',
            param=param,
            code="invalid_mix",
        )
    try:
        report, n_prompt = await run_in_threadpool(_teacher_forced, state.pool, parsed.request, answer)
    except LoramuxError as exc:
        raise from_loramux(exc, param="messages" if "messages" in body else "prompt") from None
    chosen = (name for c in report.choices for name in c.adapters)  # an adapter unloaded meanwhile is still named
    adapters = list(dict.fromkeys([*state.pool.names, *sorted(set(chosen))]))
    try:
        out = token_rows(report, adapters, n_prompt, weights)
    except LoramuxError as exc:  # a kind of weight that did not route
        raise APIError(400, f"weights: {exc}", param="weights") from None
    return {"object": "routing.tokens", "mix": selection.mix.to_json(), "mix_source": selection.source, **out}


def _weight_kinds(value: Any) -> list[str] | None:
    """The body's ``weights``: None, or a non-empty list of kinds of base weights (``"attn_q"``)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(k, str) and k for k in value):
        raise APIError(400, f'weights must be a non-empty list of kinds of base weights such as ["attn_q"], got {value!r}', param="weights")
    return value


def _teacher_forced(pool, req, answer: str):
    """The routing report of the request's prompt tokens followed by ``answer``'s, and the prompt's length."""
    prompt = list(pool.engine_request(req).tokens)
    tokens = prompt + (pool.tokenize(answer, add_bos=False) if answer else [])
    most = min(pool.n_batch, pool.n_ctx)
    if len(tokens) > most:
        raise APIError(
            400,
            f"the prompt ({len(prompt)} tokens) and the answer ({len(tokens) - len(prompt)}) are {len(tokens)} tokens; "
            f"the routing record teacher-forces at most {most} in one batch (the server's --n-ctx and n_batch): give a shorter answer",
            param="answer",
            code="context_length_exceeded",
        )
    return pool.token_choices(tokens, req.mix), len(prompt)


def token_rows(report, adapters: list[str], n_prompt: int, weights: list[str] | None = None) -> dict[str, Any]:
    """``{"adapters", "n_prompt", "kinds", "weights", "tokens": [{"id", "piece", "part", "adapter", "shares"}]}`` of a
    TokenChoiceReport, the shares averaged over the base weights of the kinds ``weights`` (None: all)."""
    shares = report.shares(adapters, weights)
    kinds = sorted({m.split(".")[-2] for m in report.modules})
    rows = []
    for pos, piece in enumerate(report.pieces):
        column = {a: round(float(shares[i, pos]), SHARE_DIGITS) for i, a in enumerate(adapters) if shares[i, pos] > 0}
        top = max(column, key=column.__getitem__) if column else None
        rows.append(
            {"id": report.tokens[pos], "piece": piece, "part": "prompt" if pos < n_prompt else "answer", "adapter": top, "shares": column}
        )
    return {"adapters": adapters, "n_prompt": n_prompt, "kinds": kinds, "weights": weights, "tokens": rows}


__all__ = ["router", "token_rows"]
