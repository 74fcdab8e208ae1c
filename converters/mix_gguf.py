"""One GGUF LoRA adapter that holds a weighted mix of GGUF adapters exactly: rank concatenation.

For a mix ``{a: w_a}`` every module's delta is ``sum_a w_a k_a B_a A_a`` (``k_a`` = the adapter's
``alpha / r``, :func:`loramux.converters.scale.llama_scaling`), which is one LoRA of rank
``sum_a r_a``::

    A = [w_1 k_1 A_1; w_2 k_2 A_2; ...]   (rows stacked)       B = [B_1, B_2, ...]   (columns)

written with ``alpha = 0`` (llama.cpp then scales by 1), so stock llama.cpp applies exactly the
mix at user scale 1.0. Token-embedding LoRAs concatenate the same way along their rank axis.
Modules that only some adapters adapt get only those adapters' parts. Tensors stay float32 by
default (``outtype``), so nothing is rounded beyond the source files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .base_gguf import read_base_model
from .errors import AdapterError
from .gguf_adapter import AdapterHeader, GgufLoraTensors, OutType, write_gguf_lora
from .gguf_header import read_gguf_header
from .gguf_to_torch import dequantized_tensors
from .scale import llama_scaling

ALPHA_KEY = "adapter.lora.alpha"
EMBEDDING = "token_embd.weight"


def _modules(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    tensors = dequantized_tensors(path)
    alpha = float(read_gguf_header(path).metadata.get(ALPHA_KEY) or 0.0)
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            if base + ".lora_b" not in tensors:
                raise AdapterError(f"{path}: {name} has no matching .lora_b")
            out[base] = (tensors[name], tensors[base + ".lora_b"])
    if not out:
        raise AdapterError(f"{path} holds no LoRA tensors")
    return out, alpha


def concatenated_modules(mix: Mapping[str, float], files: Mapping[str, str | os.PathLike]) -> list[GgufLoraTensors]:
    """The rank-concatenated modules of ``mix`` (adapter -> weight) over GGUF ``files`` (adapter -> path)."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, weight in mix.items():
        if name not in files:
            raise AdapterError(f"mix adapter {name!r} has no GGUF file")
        modules, alpha = _modules(Path(files[name]))
        for tensor, (a, b) in modules.items():
            embedding = tensor == EMBEDDING
            rank = a.shape[1] if embedding else a.shape[0]
            scaled = np.float32(weight * llama_scaling(alpha, rank)) * a
            parts.setdefault(tensor, []).append((scaled, b))
    planned = []
    for tensor in sorted(parts):
        a_axis = 1 if tensor == EMBEDDING else 0
        a = np.concatenate([p[0] for p in parts[tensor]], axis=a_axis).astype(np.float32)
        b = np.concatenate([p[1] for p in parts[tensor]], axis=1).astype(np.float32)
        planned.append(GgufLoraTensors(tensor, a, b))
    return planned


def write_mix_gguf(
    mix: Mapping[str, float],
    files: Mapping[str, str | os.PathLike],
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    outtype: OutType = "f32",
) -> Path:
    """Write ``mix`` as one GGUF adapter for ``base`` at ``out`` (atomically); return the path."""
    live = {n: float(w) for n, w in mix.items() if w != 0.0}
    if not live:
        raise AdapterError("the mix has no adapter with a non-zero weight: nothing to write")
    planned = concatenated_modules(live, files)
    header = AdapterHeader(name=name or Path(out).stem, alpha=0.0, source="loramux mix (rank concatenation)", peft_type="LORA")
    return write_gguf_lora(out, planned, read_base_model(base), header, outtype=outtype)


def averaged_modules(weights: Mapping[str, float], files: Mapping[str, str | os.PathLike]) -> tuple[list[GgufLoraTensors], float]:
    """LoraHub's own merge: ``A = sum w_a A_a`` and ``B = sum w_a B_a`` per module (cross terms), and the alpha.

    Every adapter must adapt the same modules with the same rank and alpha (LoraHub's setting);
    otherwise AdapterError names the first that differs."""
    merged: dict[str, list[np.ndarray]] = {}
    shape_of: dict[str, tuple] = {}
    alpha0, first = None, None
    for name, weight in weights.items():
        modules, alpha = _modules(Path(files[name]))
        shapes = {t: (a.shape, b.shape) for t, (a, b) in modules.items()}
        if first is None:
            first, alpha0, shape_of = name, alpha, shapes
        elif shapes != shape_of or alpha != alpha0:
            raise AdapterError(f"LoraHub's A/B merge needs adapters of one rank, alpha and module set: {name!r} differs from {first!r}")
        for tensor, (a, b) in modules.items():
            acc = merged.setdefault(tensor, [np.zeros_like(a, dtype=np.float64), np.zeros_like(b, dtype=np.float64)])
            acc[0] += weight * a
            acc[1] += weight * b
    planned = [GgufLoraTensors(t, v[0].astype(np.float32), v[1].astype(np.float32)) for t, v in sorted(merged.items())]
    return planned, float(alpha0 or 0.0)


def write_averaged_gguf(
    weights: Mapping[str, float],
    files: Mapping[str, str | os.PathLike],
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
) -> Path:
    """Write LoraHub's A/B-averaged merge of ``weights`` as one GGUF adapter (f32), atomically."""
    planned, alpha = averaged_modules(weights, files)
    header = AdapterHeader(name=name or Path(out).stem, alpha=alpha, source="loramux LoraHub A/B merge", peft_type="LORA")
    return write_gguf_lora(out, planned, read_base_model(base), header, outtype="f32")


__all__ = ["averaged_modules", "concatenated_modules", "write_averaged_gguf", "write_mix_gguf"]
