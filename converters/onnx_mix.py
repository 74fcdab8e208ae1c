"""Exact weighted mixes of LoRA adapters as ONE onnxruntime adapter, by rank concatenation.

onnxruntime does not sum two active adapters: parameters with the same name override
each other (measured with onnxruntime 1.32: the adapter added first wins). A mix
``{a: w_a}`` means the output-space sum ``sum_a w_a * delta_a(x)`` (see :mod:`.scale`),
and per module that sum is itself one LoRA path of the summed rank::

    x @ [A_1 | A_2 | ...] @ [w_1 B_1 ; w_2 B_2 ; ...]  ==  sum_a w_a * (x @ A_a) @ B_a

with the ONNX layouts ``A_a: [in, r_a]`` and ``B_a: [r_a, out]`` (PEFT scaling already
folded into ``B_a``). A module only some adapters touch concatenates only those; no cross
terms ``A_i B_j`` appear (unlike averaging A's and B's separately). Zero weights drop the
adapter.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .base_gguf import BaseModelInfo, read_base_model
from .errors import AdapterError
from .onnx_adapter import ONNX_DTYPES, OnnxDType, onnx_adapter_parameters, write_onnx_adapter
from .onnx_names import lora_parameter_names, split_parameter_name


def _check_weights(weights: Mapping[str, float], known: Mapping[str, object]) -> dict[str, float]:
    clean: dict[str, float] = {}
    for name, w in weights.items():
        if name not in known:
            raise AdapterError(f"mix names adapter {name!r}, which is not among the adapters given ({sorted(known)})")
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating)) or not math.isfinite(float(w)):
            raise AdapterError(f"weight of {name!r} in the mix is {w!r}; weights must be finite numbers")
        if float(w) != 0.0:
            clean[name] = float(w)
    if not clean:
        raise AdapterError("the mix has no adapter with a non-zero weight; run the base model without an adapter instead")
    return clean


def _modules(name: str, params: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, array in params.items():
        split = split_parameter_name(key)
        if split is None:
            raise AdapterError(f"adapter {name!r}: parameter {key!r} is not a <prefix>.lora_A/lora_B.MatMul.weight name")
        found.setdefault(split[0], {})[split[1]] = array
    pairs = {}
    for prefix, parts in found.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterError(f"adapter {name!r}: module {prefix!r} has only {sorted(parts)}")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(f"adapter {name!r}: module {prefix!r} has A {list(a.shape)} and B {list(b.shape)}, not [in, r] and [r, out]")
        pairs[prefix] = (a, b)
    return pairs


def mix_onnx_parameters(
    adapters: Mapping[str, Mapping[str, np.ndarray]],
    weights: Mapping[str, float],
    *,
    dtype: OnnxDType | None = None,
) -> dict[str, np.ndarray]:
    """One adapter's parameters computing the weighted sum of ``adapters`` (``{name: {param: array}}``) exactly.

    ``weights`` maps adapter names to weights (names absent from it are not used). The result
    is in ``dtype`` (default: the dtype of the first adapter's parameters); the arithmetic is float32.
    """
    mix = _check_weights(weights, adapters)
    per_module: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for name, w in mix.items():
        for prefix, (a, b) in _modules(name, adapters[name]).items():
            per_module.setdefault(prefix, []).append((a, b, w))
    out_dtype = np.dtype(dtype or next(iter(adapters[next(iter(mix))].values())).dtype)
    if out_dtype.name not in ONNX_DTYPES:
        raise ValueError(f"dtype must be one of {ONNX_DTYPES}, got {out_dtype}")
    params: dict[str, np.ndarray] = {}
    for prefix, parts in per_module.items():
        shapes = {(a.shape[0], b.shape[1]) for a, b, _ in parts}
        if len(shapes) != 1:
            raise AdapterError(f"module {prefix!r} has different [in, out] shapes across the mixed adapters: {sorted(shapes)}")
        a_name, b_name = lora_parameter_names(prefix)
        params[a_name] = np.ascontiguousarray(np.concatenate([a.astype(np.float32) for a, _, _ in parts], axis=1), dtype=out_dtype)
        params[b_name] = np.ascontiguousarray(
            np.concatenate([np.float32(w) * b.astype(np.float32) for _, b, w in parts], axis=0), dtype=out_dtype
        )
    return params


def mix_peft_to_onnx_parameters(
    peft_dirs: Mapping[str, str | os.PathLike],
    weights: Mapping[str, float],
    base: str | os.PathLike | BaseModelInfo,
    *,
    dtype: OnnxDType = "float32",
    skip_embeddings: bool = False,
) -> dict[str, np.ndarray]:
    """Convert the PEFT folders ``{name: path}`` that ``weights`` uses and mix them in memory (per-request use)."""
    info = base if isinstance(base, BaseModelInfo) else read_base_model(base)
    used = _check_weights(weights, peft_dirs)
    converted = {name: onnx_adapter_parameters(peft_dirs[name], info, dtype="float32", skip_embeddings=skip_embeddings) for name in used}
    return mix_onnx_parameters(converted, used, dtype=dtype)


def write_onnx_mix(
    peft_dirs: Mapping[str, str | os.PathLike],
    weights: Mapping[str, float],
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: OnnxDType = "float32",
    skip_embeddings: bool = False,
) -> Path:
    """Write the exact mix of PEFT folders as one onnxruntime adapter file (atomically); return the path."""
    params = mix_peft_to_onnx_parameters(peft_dirs, weights, base, dtype=dtype, skip_embeddings=skip_embeddings)
    return write_onnx_adapter(params, out)
