"""PEFT LoRA checkpoint -> onnxruntime adapter file (``onnxruntime.AdapterFormat``), exactly.

An onnxruntime adapter is a flat set of named tensors that onnxruntime feeds to the graph
inputs of the same names (``RunOptions.add_active_adapter``). loramux writes the names,
layouts and scale of onnxruntime-genai's model builder (see :mod:`.onnx_names`)::

    <prefix>.lora_A.MatMul.weight   [in, r]    = PEFT A.T
    <prefix>.lora_B.MatMul.weight   [r, out]   = (PEFT scaling * B).T

``scaling`` is :attr:`LoraModule.scaling`, the one PEFT scale computed in
:mod:`.scale` (alpha/r, alpha/sqrt(r) with rsLoRA, per-module rank_pattern /
alpha_pattern): the whole of it is folded into B, because the ONNX graph applies no
scale of its own. Modules the adapter does not touch are left out of the file: the
model's LoRA inputs then keep their default values (empty, rank 0, in loramux's
base model), which contribute nothing.

The PEFT reader, validation and refusals are those of the GGUF converter
(:func:`load_peft_adapter`); output files are written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping

import numpy as np

from . import onnx_deps
from .atomic import atomic_output
from .base_gguf import BaseModelInfo, read_base_model
from .base_match import check_module_fits, locate_base_tensor
from .errors import AdapterError, BaseModelMismatchError, UnsupportedAdapterError
from .name_map import ARCHITECTURES
from .onnx_names import lora_parameter_names, onnx_fused_parts, onnx_prefix
from .peft_checkpoint import LoraModule, PeftAdapter, load_peft_adapter

OnnxDType = Literal["float32", "float16"]
ONNX_DTYPES: tuple[str, ...] = ("float32", "float16")

# AdapterFormat header fields loramux writes (onnxruntime does not check them at load time).
ADAPTER_VERSION = 1
MODEL_VERSION = 1


@dataclass(frozen=True)
class OnnxLoraPair:
    """One module in ONNX layout (float32): the two graph-input tensors of its LoRA path."""

    module: str  # PEFT module, e.g. model.layers.3.self_attn.q_proj
    prefix: str  # ONNX prefix, e.g. model.layers.3.attn.q_proj
    lora_a: np.ndarray  # [in, r]
    lora_b: np.ndarray  # [r, out], PEFT scaling folded in

    @property
    def names(self) -> tuple[str, str]:
        return lora_parameter_names(self.prefix)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])


def _row_blocks(kinds: tuple[str, ...], n_rows: int, base: BaseModelInfo) -> list[int]:
    """Row counts of a fused module's parts: "q" and "kv" from the base's head counts, "half" of the rows."""
    h, arch = base.hparams, base.architecture
    n_head = int(h[f"{arch}.attention.head_count"])
    n_kv = int(h.get(f"{arch}.attention.head_count_kv", n_head))
    sizes = {"q": n_head * base.head_dim, "kv": n_kv * base.head_dim, "half": n_rows // 2}
    return [sizes[k] for k in kinds]


def plan_onnx_module(module: LoraModule, base: BaseModelInfo) -> list[OnnxLoraPair]:
    """Map one PEFT linear module onto its ONNX LoRA inputs (one pair, or one per unpacked part) and check it against the base."""
    fused = onnx_fused_parts(module.name)
    prefixes = [p for p, _ in fused] if fused else [onnx_prefix(module.name)]
    if prefixes[0] is None:
        raise BaseModelMismatchError(
            f"module {module.name!r} has no LoRA input in onnxruntime-genai's layout for a {base.architecture!r} model; "
            "the adapter targets a module the ONNX model does not adapt, or was built for another architecture"
        )
    tensor, shape = locate_base_tensor(module, base)
    check_module_fits(module, tensor, shape)
    a = np.ascontiguousarray(module.A.T, dtype=np.float32)
    b = (module.B.astype(np.float64) * module.scaling).T  # [r, out]
    if not fused:
        return [OnnxLoraPair(module.name, prefixes[0], a, np.ascontiguousarray(b, dtype=np.float32))]
    blocks = _row_blocks(tuple(k for _, k in fused), b.shape[1], base)
    if sum(blocks) != b.shape[1]:
        raise BaseModelMismatchError(f"module {module.name!r}: {b.shape[1]} output rows do not split into the parts {blocks} of {tensor!r}")
    cuts = np.cumsum([0, *blocks])
    return [
        OnnxLoraPair(module.name, prefix, a, np.ascontiguousarray(b[:, lo:hi], dtype=np.float32))
        for prefix, lo, hi in zip(prefixes, cuts[:-1], cuts[1:])
    ]


def plan_onnx_adapter(adapter: PeftAdapter, base: BaseModelInfo, *, skip_embeddings: bool = False) -> list[OnnxLoraPair]:
    """Validate every module of ``adapter`` against ``base`` and lay it out for ONNX, before anything is written."""
    row = ARCHITECTURES.get(base.architecture)
    if row is None or not row.onnx:
        checked = sorted(a for a, r in ARCHITECTURES.items() if r.onnx)
        raise UnsupportedAdapterError(
            f"base model {base.path} has architecture {base.architecture!r}: loramux's ONNX adapter layout is checked "
            f"for {checked} only; convert to GGUF instead (loramux convert --to gguf)"
        )
    modules = adapter.modules
    embedding = [m for m in modules if m.kind == "embedding"]
    if embedding:
        if not skip_embeddings:
            raise UnsupportedAdapterError(
                f"{adapter.path}: adapts the token embeddings ({embedding[0].name}); ONNX models built by onnxruntime-genai "
                "(and loramux's ONNX base) have no LoRA input on the embedding Gather. Merge the adapter into the base "
                "model, or pass --skip-embeddings (skip_embeddings=True) to drop the embedding LoRA (the rest stays "
                "exact, the result differs from PEFT)"
            )
        modules = [m for m in modules if m.kind != "embedding"]
    if not modules:
        raise UnsupportedAdapterError(f"{adapter.path}: nothing left to convert")
    return [pair for m in modules for pair in plan_onnx_module(m, base)]


def pairs_to_parameters(pairs: list[OnnxLoraPair], dtype: OnnxDType = "float32") -> dict[str, np.ndarray]:
    """``{graph input name: array}`` in the requested dtype, A then B per module."""
    if dtype not in ONNX_DTYPES:
        raise ValueError(f"dtype must be one of {ONNX_DTYPES}, got {dtype!r}")
    params: dict[str, np.ndarray] = {}
    for p in pairs:
        a_name, b_name = p.names
        params[a_name] = np.ascontiguousarray(p.lora_a, dtype=dtype)
        params[b_name] = np.ascontiguousarray(p.lora_b, dtype=dtype)
    return params


def onnx_adapter_parameters(
    peft: str | os.PathLike | PeftAdapter,
    base: str | os.PathLike | BaseModelInfo,
    *,
    dtype: OnnxDType = "float32",
    skip_embeddings: bool = False,
    allow_pickle: bool = False,
) -> dict[str, np.ndarray]:
    """The parameters of the onnxruntime adapter for one PEFT checkpoint, in memory.

    Feed them as extra inputs of ``InferenceSession.run`` (per request, no file), or write
    them with :func:`write_onnx_adapter`.
    """
    adapter = peft if isinstance(peft, PeftAdapter) else load_peft_adapter(peft, allow_pickle=allow_pickle)
    info = base if isinstance(base, BaseModelInfo) else read_base_model(base)
    return pairs_to_parameters(plan_onnx_adapter(adapter, info, skip_embeddings=skip_embeddings), dtype)


def write_onnx_adapter(params: Mapping[str, np.ndarray], out: str | os.PathLike) -> Path:
    """Write ``{name: array}`` as an onnxruntime adapter file, atomically; return the path."""
    ort = onnx_deps.onnxruntime()
    if not params:
        raise AdapterError(f"{out}: refusing to write an adapter with no parameters")
    # OrtValue.ortvalue_from_numpy does not copy: keep these arrays referenced until export_adapter returns.
    arrays = {name: np.ascontiguousarray(a) for name, a in params.items()}
    for name, a in arrays.items():
        if a.dtype not in (np.float32, np.float16) or a.ndim != 2:
            raise AdapterError(f"{out}: parameter {name!r} is {a.dtype} with shape {list(a.shape)}; expected a 2-D float32/float16 array")
    values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
    with atomic_output(out) as tmp:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(ADAPTER_VERSION)
        fmt.set_model_version(MODEL_VERSION)
        fmt.set_parameters(values)
        fmt.export_adapter(str(tmp))
    del values, arrays
    return Path(out)


def read_onnx_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an onnxruntime adapter file back as ``{name: numpy array}`` (copies)."""
    ort = onnx_deps.onnxruntime()
    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"{p}: no such onnxruntime adapter file")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(p))
    except Exception as exc:  # onnxruntime raises its own RuntimeError types on a bad file
        raise AdapterError(f"{p}: not a readable onnxruntime adapter file ({exc})") from exc
    return {name: np.array(value.numpy(), copy=True) for name, value in fmt.get_parameters().items()}


def convert_peft_to_onnx_adapter(
    peft_dir: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: OnnxDType = "float32",
    skip_embeddings: bool = False,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert a PEFT LoRA folder into an onnxruntime adapter file for ``base``; return the output path.

    ``dtype`` must match the LoRA inputs of the model that will run it (float32 for loramux's
    ONNX base and for onnxruntime-genai CPU fp32/int4 builds, float16 for fp16 builds).
    Raises ``AdapterError`` (and subclasses), ``BaseModelError`` or ``MissingExtraError``;
    on error no output file exists.
    """
    onnx_deps.onnxruntime()  # fail before any work when the extra is missing
    adapter = load_peft_adapter(peft_dir, allow_pickle=allow_pickle)
    info = read_base_model(base)
    pairs = plan_onnx_adapter(adapter, info, skip_embeddings=skip_embeddings)
    if progress:
        progress(len(pairs), len(pairs))
    return write_onnx_adapter(pairs_to_parameters(pairs, dtype), out)
