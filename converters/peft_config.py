"""Validation of a PEFT ``adapter_config.json``: what loramux can express, and why not otherwise."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from .errors import AdapterError, UnsupportedAdapterError


def _truthy(value: Any) -> bool:
    return bool(value)


_MERGE_HINT = "merge it into the base model with PEFT's merge_and_unload() and convert the merged model instead"

# (config key, refused when, why and what to do). Keys that only affect initialisation
# (init_lora_weights, loftq_config, eva_config, corda_config) do not change the delta.
REFUSED_CONFIG: list[tuple[str, Callable[[Any], bool], str]] = [
    ("use_dora", _truthy, "DoRA (use_dora=true) rescales every output column by a learned magnitude vector, which llama.cpp LoRA adapters cannot express; " + _MERGE_HINT),
    ("modules_to_save", _truthy, "modules_to_save holds fully retrained modules ({value}), not low-rank deltas; a LoRA adapter file cannot carry them; " + _MERGE_HINT),
    ("bias", lambda v: v not in (None, "none"), "bias={value!r} trains bias vectors, which a LoRA adapter file cannot carry; retrain with bias='none' or " + _MERGE_HINT),
    ("lora_bias", _truthy, "lora_bias=true adds a bias to lora_B, which llama.cpp LoRA adapters cannot express; " + _MERGE_HINT),
    ("fan_in_fan_out", _truthy, "fan_in_fan_out=true (Conv1D layers, GPT-2 style) is not supported; only nn.Linear / nn.Embedding targets are"),
    ("use_qalora", _truthy, "QA-LoRA (use_qalora=true) pools inputs by group before lora_A; llama.cpp cannot express it; " + _MERGE_HINT),
    ("alora_invocation_tokens", _truthy, "activated LoRA (alora_invocation_tokens) is not supported by loramux yet"),
    ("trainable_token_indices", _truthy, "trainable_token_indices retrains embedding rows, which a LoRA adapter file cannot carry; " + _MERGE_HINT),
    ("layer_replication", _truthy, "layer_replication changes the model's layer stack; a LoRA adapter file cannot express it"),
    ("target_parameters", _truthy, "target_parameters (LoRA on nn.Parameter, e.g. MoE experts) is not supported"),
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
        raise AdapterError(f"{folder}: no adapter_config.json; a PEFT LoRA folder is what save_pretrained() writes (adapter_config.json + adapter_model.safetensors)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"{path}: peft_type is {peft_type!r}; loramux converts LoRA adapters (peft_type 'LORA') only")
    for key, refused, why in REFUSED_CONFIG:
        value = config.get(key)
        if value is not None and refused(value):
            raise UnsupportedAdapterError(f"{folder}: {why.format(value=value)}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (key == "r" and value <= 0):
            raise AdapterError(f"{path}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{path}: {key} must be an object mapping module patterns to numbers")
    return config


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix at a dot boundary (or as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
