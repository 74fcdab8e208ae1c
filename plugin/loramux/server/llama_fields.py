"""llama-server's request fields, as loramux reads them: renamed, accepted, or refused with 400.

llama-server clients send fields OpenAI does not have (tools/server's request schema). Each one
here is either computed under loramux's own name (``n_predict`` is ``max_tokens``), accepted
because it cannot change the answer (``cache_prompt``: the prefix cache is exact under a mix), or
accepted only at the value that switches its sampler off, and refused with a 400 naming it
otherwise. A field is never ignored when it would change what is generated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from loramux.server.errors import APIError

# llama-server's name -> loramux's name (same meaning)
RENAMED = {"n_predict": "max_tokens", "repeat_last_n": "penalty_last_n", "n_cmpl": "n"}


def _off(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v in values


def _negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0


# field -> the test of a value that leaves the answer unchanged (the sampler or feature is off)
OFF_WHEN = {
    "mirostat": _off(0),
    "dynatemp_range": _off(0, 0.0),
    "xtc_probability": _off(0, 0.0),
    "dry_multiplier": _off(0, 0.0),
    "top_n_sigma": lambda v: _negative(v) or (isinstance(v, (int, float)) and math.isinf(v)),
    "ignore_eos": _off(False),
    "t_max_predict_ms": lambda v: v in (0, -1) or _negative(v),
    "n_indent": _off(0),
    "post_sampling_probs": _off(False),
    "min_keep": _off(0, 1),
    "n_discard": _off(0),
    "adaptive_target": lambda v: _negative(v),
    "backend_sampling": _off(False),
}
REASONS = {
    "mirostat": "mirostat sampling",
    "dynatemp_range": "dynamic temperature",
    "xtc_probability": "the XTC sampler",
    "dry_multiplier": "the DRY sampler",
    "top_n_sigma": "top-n-sigma sampling",
    "ignore_eos": "generation past the end-of-generation token",
    "t_max_predict_ms": "a time limit on generation",
    "n_indent": "indentation limits",
    "post_sampling_probs": "probabilities after the sampler chain (loramux reports the model's)",
    "min_keep": "min_keep above 1",
    "n_discard": "context shifting",
    "adaptive_target": "the adaptive-p sampler",
    "backend_sampling": "sampling in the backend",
}

# fields that cannot change what is generated here, whatever their value
NO_EFFECT = (
    "cache_prompt",  # the prefix cache is exact: K/V is reused only under the same mix
    "id_slot",
    "n_keep",  # context shifting is off
    "n_cache_reuse",
    "timings_per_token",  # the routes add timings to the answer
    "response_fields",  # /completion picks the fields of its answer
    "return_tokens",  # /completion adds the token ids to its answer
    "verbose",  # the routes add "__verbose" (the prompt as read) to the answer
    "return_progress",
    "t_max_prompt_ms",
    "dynatemp_exponent",
    "mirostat_tau",
    "mirostat_eta",
    "xtc_threshold",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "adaptive_decay",
)
REFUSED = {
    "samplers": "a custom sampler order (loramux's order is llama-cpp-python's: penalties, top-k, typical, top-p, min-p, temperature)",
    "speculative.type": "speculative decoding",
    "lora_routing": 'lora_routing (give "mix": "arrow" or "spectr" instead)',
    "image_data": "images",
    "multimodal_data": "images and audio",
    "input_extra": "infill",
}


def token_bias(raw: Any, tokenize: Callable[[str], list[int]]) -> Any:
    """llama-server's ``logit_bias`` shapes as ``{token id: bias}``: an object or a list of
    ``[id or text, bias]`` pairs; a text biases each of its tokens; a bias of ``false`` bans the
    token (-inf). Other values are left for the sampling checks to refuse, naming the field."""
    pairs = raw.items() if isinstance(raw, Mapping) else raw if isinstance(raw, list) else None
    if pairs is None or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        return raw
    out: dict[Any, Any] = {}
    for key, bias in pairs:
        bias = -math.inf if bias is False else bias
        if isinstance(key, str) and not key.strip().lstrip("-").isdigit():
            for token in tokenize(key):
                out[token] = bias
        else:
            out[key] = bias
    return out


def translate(body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` with llama-server's names renamed to loramux's, its no-effect fields dropped, and a
    400 naming the first field that would change the answer in a way loramux does not compute."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in REFUSED and value not in (None, [], {}, ""):
            raise APIError(400, f"{key}: loramux does not compute {REFUSED[key]}", param=key)
        if key in OFF_WHEN:
            if value is not None and not OFF_WHEN[key](value):
                raise APIError(400, f"{key}={value!r}: loramux does not compute {REASONS[key]}", param=key)
            continue
        if key in NO_EFFECT:
            continue
        name = RENAMED.get(key, key)
        if name != key and value is not None:
            given = body.get(name)
            if given is not None and given != value:
                raise APIError(400, f"{key}={value!r} and {name}={given!r} disagree: give one of them", param=key)
        if name not in out or value is not None:
            out[name] = value
    return out


__all__ = ["NO_EFFECT", "OFF_WHEN", "REFUSED", "RENAMED", "token_bias", "translate"]
