"""Validation of a PEFT ``adapter_config.json``: what loramux can express, and why not otherwise."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from .errors import AdapterError, UnsupportedAdapterError

try:
    from re import _parser as _sre_parse  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_MAX_UNBOUNDED_REPEATS = 3


def _truthy(value: Any) -> bool:
    return bool(value)


_MERGE_HINT = "merge it into the base model with PEFT's merge_and_unload() and convert the merged model instead"

# (config key, refused when, why and what to do). Keys that only affect initialisation
# (init_lora_weights, loftq_config, eva_config, corda_config) do not change the delta.
REFUSED_CONFIG: list[tuple[str, Callable[[Any], bool], str]] = [
    (
        "use_dora",
        _truthy,
        "DoRA (use_dora=true) rescales every output column by a learned magnitude vector, which llama.cpp LoRA adapters cannot express; "
        + _MERGE_HINT,
    ),
    (
        "modules_to_save",
        _truthy,
        "modules_to_save holds fully retrained modules ({value}), not low-rank deltas; a LoRA adapter file cannot carry them; "
        + _MERGE_HINT,
    ),
    (
        "bias",
        lambda v: v not in (None, "none"),
        "bias={value!r} trains bias vectors, which a LoRA adapter file cannot carry; retrain with bias='none' or " + _MERGE_HINT,
    ),
    ("lora_bias", _truthy, "lora_bias=true adds a bias to lora_B, which llama.cpp LoRA adapters cannot express; " + _MERGE_HINT),
    (
        "fan_in_fan_out",
        _truthy,
        "fan_in_fan_out=true (Conv1D layers, GPT-2 style) is not supported; only nn.Linear / nn.Embedding targets are",
    ),
    ("use_qalora", _truthy, "QA-LoRA (use_qalora=true) pools inputs by group before lora_A; llama.cpp cannot express it; " + _MERGE_HINT),
    ("alora_invocation_tokens", _truthy, "activated LoRA (alora_invocation_tokens) is not supported by loramux yet"),
    (
        "trainable_token_indices",
        _truthy,
        "trainable_token_indices retrains embedding rows, which a LoRA adapter file cannot carry; " + _MERGE_HINT,
    ),
    ("layer_replication", _truthy, "layer_replication changes the model's layer stack; a LoRA adapter file cannot express it"),
    (
        "target_parameters",
        _truthy,
        "target_parameters (LoRA on nn.Parameter, e.g. MoE experts) is not supported: llama.cpp keeps a layer's "
        "experts in one 3-D tensor and has no per-expert LoRA; convert an adapter of the attention modules only, or merge it",
    ),
    ("megatron_config", _truthy, "Megatron parallel LoRA layers are not supported"),
    ("use_bdlora", _truthy, "block-diagonal LoRA (use_bdlora) is not supported"),
    ("arrow_config", _truthy, "Arrow routing (arrow_config) is not a plain LoRA delta and is not supported"),
    ("monteclora_config", _truthy, "MonteCLoRA (monteclora_config) is not a plain LoRA delta and is not supported"),
    ("kasa_config", _truthy, "KaSA (kasa_config) is not a plain LoRA delta and is not supported"),
    ("velora_config", _truthy, "VeLoRA (velora_config) is not supported"),
]


def load_config(folder: Path) -> dict[str, Any]:
    """Read and validate ``adapter_config.json``; raise with the reason and the fix."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(
            f"{folder}: no adapter_config.json; a PEFT LoRA folder is what save_pretrained() writes (adapter_config.json + adapter_model.safetensors)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4300+ digit numbers, deep nesting
        raise AdapterError(f"{path}: not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type is {_short(peft_type)}; loramux converts LoRA adapters (peft_type 'LORA') only")
    for key, refused, why in REFUSED_CONFIG:
        value = config.get(key)
        if value is not None and refused(value):
            raise UnsupportedAdapterError(f"{folder}: {why.format(value=value)}")
    for key in ("r", "lora_alpha"):
        if _number(config.get(key), rank=key == "r") is None:
            raise AdapterError(
                f"{path}: {key} must be a positive number{' (a whole one)' if key == 'r' else ''}, got {_short(config.get(key))}"
            )
    for key in ("rank_pattern", "alpha_pattern"):
        _check_patterns(path, key, config.get(key) or {})
    return config


def _number(value: Any, *, rank: bool) -> float | None:
    """``value`` as a finite float (a rank: a whole number > 0; an alpha: >= 0), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    if not math.isfinite(number) or number < 0 or (rank and (number == 0 or not number.is_integer())):
        return None
    return number


def _check_patterns(path: Path, key: str, patterns: Any) -> None:
    """rank_pattern / alpha_pattern: an object of module regexes (as PEFT matches them) to numbers."""
    if not isinstance(patterns, dict):
        raise AdapterError(f"{path}: {key} must be an object mapping module patterns to numbers")
    for pattern, value in patterns.items():
        if _number(value, rank=key == "rank_pattern") is None:
            what = "a positive whole number" if key == "rank_pattern" else "a number >= 0"
            raise AdapterError(f"{path}: {key}[{_short(pattern)}] must be {what}, got {_short(value)}")
        try:
            re.compile(_pattern_regex(pattern))
            slow = _backtracks_badly(pattern)
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise AdapterError(f"{path}: {key} key {_short(pattern)} is not a valid regular expression ({exc})") from exc
        if slow:
            raise AdapterError(
                f"{path}: {key} key {_short(pattern)} nests repetitions (or has more than {_MAX_UNBOUNDED_REPEATS} unbounded ones), "
                "which can take exponential time to match; use module names (PEFT matches them as dotted suffixes) or a simpler regex"
            )


def _backtracks_badly(pattern: str) -> bool:
    """True when a regex can backtrack for ever on a module name (Python's re has no time limit).

    Refused: a repetition (at most > 1) that holds another such repetition or an alternation,
    e.g. ``(.*.*)*z`` or ``(.|.)*z``; and more than a few unbounded repetitions (``.*.*.*.*.*z``).
    """
    stars = 0

    def walk(sub: Any, inside: bool) -> bool:
        nonlocal stars
        for op, av in sub:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                _, most, body = av
                stars += most == _sre_parse.MAXREPEAT
                if (inside and most > 1) or walk(body, inside or most > 1):
                    return True
            elif name == "BRANCH":
                if inside or any(walk(b, inside) for b in av[1]):
                    return True
            else:
                parts = av if isinstance(av, (tuple, list)) else (av,)
                if any(isinstance(x, _sre_parse.SubPattern) and walk(x, inside) for x in parts):
                    return True
        return False

    return walk(_sre_parse.parse(pattern), False) or stars > _MAX_UNBOUNDED_REPEATS


def _pattern_regex(key: str) -> str:
    """The regex PEFT builds from a rank_pattern / alpha_pattern key."""
    return rf"(.*\.)?({key})$"


def _short(value: Any, limit: int = 120) -> str:
    """repr() of a config value, cut so that a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(cut)"


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix at a dot boundary (or as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(_pattern_regex(key), module):
            return value
    return default
