"""PEFT LoRA checkpoint -> GGUF LoRA adapter that stock llama.cpp loads, with PEFT's exact deltas."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from .atomic import atomic_output
from .base_gguf import BaseModelInfo, read_base_model
from .base_match import check_module_fits, locate_base_tensor
from .errors import BaseModelMismatchError, UnsupportedAdapterError
from .name_map import ARCHITECTURES, permutation_key, permute_rows, supported_architectures
from .peft_checkpoint import LoraModule, PeftAdapter, load_peft_adapter
from .scale import fold_factor

OutType = Literal["f32", "f16", "bf16", "q8_0"]
OUT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")

# Keys loramux adds to the GGUF (llama.cpp ignores unknown keys).
KEY_SOURCE = "loramux.source"
KEY_BASE_FINGERPRINT = "loramux.base_fingerprint"
KEY_PEFT_TYPE = "loramux.peft_type"


@dataclass(frozen=True)
class GgufLoraTensors:
    """One module in file layout: numpy arrays ready for GGUFWriter (numpy order = ne reversed)."""

    base_tensor: str
    lora_a: np.ndarray  # (r, in), or (vocab, r) for token_embd
    lora_b: np.ndarray  # (out, r), or (dim, r) for token_embd


def _check_arch(base: BaseModelInfo) -> None:
    if base.architecture not in ARCHITECTURES:
        raise UnsupportedAdapterError(
            f"base model {base.path} has architecture {base.architecture!r}, which loramux does not convert for: "
            f"its transforms are checked for {supported_architectures()} (docs/architectures.md says how to add one)"
        )


def plan_module(module: LoraModule, base: BaseModelInfo, alpha_file: float) -> GgufLoraTensors:
    """Map one PEFT module onto its base tensor, validate shapes and apply the scale convention."""
    tensor, shape = locate_base_tensor(module, base)
    check_module_fits(module, tensor, shape)
    fold = fold_factor(module.scaling, alpha_file, module.rank)
    scaled_b = module.B if fold == 1.0 else module.B * np.float32(fold)  # plain LoRA: PEFT's B as it is
    if module.kind == "embedding":
        return GgufLoraTensors(tensor, np.ascontiguousarray(module.A.T), scaled_b)
    b = scaled_b
    head_key = permutation_key(base.architecture, tensor)
    if head_key is not None:
        b = permute_rows(b, int(base.hparams[head_key]))
    return GgufLoraTensors(tensor, module.A, np.ascontiguousarray(b))


def _encode(array: np.ndarray, outtype: str):
    """Return (data, raw_dtype) for GGUFWriter.add_tensor; q8_0 needs rows of 32, else f16."""
    import gguf

    if outtype == "f32":
        return array.astype(np.float32), None
    if outtype == "f16" or (outtype == "q8_0" and array.shape[-1] % 32):
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _encoded_info(array: np.ndarray, outtype: str):
    """(numpy dtype, raw ggml type or None, byte size) that :func:`_encode` gives ``array``, without encoding it."""
    import gguf

    if outtype == "f32":
        return np.dtype(np.float32), None, array.size * 4
    if outtype == "f16" or (outtype == "q8_0" and array.shape[-1] % 32):
        return np.dtype(np.float16), None, array.size * 2
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    # a non-uint8 dtype with raw_dtype tells GGUFWriter the shape is in elements, not bytes
    return np.dtype(np.float32), qtype, array.size // block * type_size


def plan_adapter(adapter: PeftAdapter, base: BaseModelInfo, *, skip_embeddings: bool = False) -> list[GgufLoraTensors]:
    """Validate every module of ``adapter`` against ``base`` before anything is written."""
    _check_arch(base)
    alpha_file = float(adapter.config["lora_alpha"])
    modules = adapter.modules
    embedding = [m for m in modules if m.kind == "embedding"]
    if embedding and base.ties_output_to_embeddings:
        if not skip_embeddings:
            raise UnsupportedAdapterError(
                f"{adapter.path}: adapts the token embeddings ({embedding[0].name}), but {base.path.name} ties its output "
                "projection to token_embd and llama.cpp would apply that LoRA to the output projection too (stock "
                "llama.cpp aborts at the first decode). Merge the adapter into the base model, or pass --skip-embeddings "
                "to drop the embedding LoRA (the rest stays exact, the result differs from PEFT)"
            )
        modules = [m for m in modules if m.kind != "embedding"]
    if not modules:
        raise UnsupportedAdapterError(f"{adapter.path}: nothing left to convert")
    planned = []
    for m in modules:
        try:
            planned.append(plan_module(m, base, alpha_file))
        except (BaseModelMismatchError, UnsupportedAdapterError) as exc:  # say which adapter, not only which module
            raise type(exc)(f"{adapter.path}: {exc}") from None
    return planned


@dataclass(frozen=True)
class AdapterHeader:
    """The metadata of a GGUF LoRA adapter that loramux writes."""

    name: str
    alpha: float  # adapter.lora.alpha: llama.cpp scales each module by alpha / r (0: by 1)
    source: str
    peft_type: str


def write_gguf_lora(
    out: str | os.PathLike,
    planned: list[GgufLoraTensors],
    info: BaseModelInfo,
    header: AdapterHeader,
    *,
    outtype: OutType = "f16",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``planned`` modules as a GGUF LoRA adapter for the base ``info``, atomically."""
    import gguf

    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=info.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, header.alpha)
        writer.add_name(header.name)
        writer.add_string(KEY_SOURCE, header.source)
        writer.add_string(KEY_PEFT_TYPE, header.peft_type)
        writer.add_string(KEY_BASE_FINGERPRINT, info.fingerprint)
        # Tensor infos first, then each tensor encoded and written on its own: the encoded
        # copies never pile up (peak memory = the adapter's arrays + one encoded tensor).
        for t in planned:
            for suffix, array in ((".lora_a", t.lora_a), (".lora_b", t.lora_b)):
                dtype, raw, nbytes = _encoded_info(array, outtype)
                writer.add_tensor_info(t.base_tensor + suffix, array.shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(planned):
            for array in (t.lora_a, t.lora_b):
                writer.write_tensor_data(_encode(array, outtype)[0])
            if progress:
                progress(i + 1, len(planned))
        writer.close()
    return Path(out)


def convert_peft_to_gguf(
    peft_dir: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: OutType = "f16",
    skip_embeddings: bool = False,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert a PEFT LoRA folder into a GGUF adapter for ``base``; return the output path.

    Raises ``AdapterError`` (and subclasses) or ``BaseModelError``; on error no output file exists.
    """
    if outtype not in OUT_TYPES:
        raise ValueError(f"outtype must be one of {OUT_TYPES}, got {outtype!r}")
    adapter = load_peft_adapter(peft_dir, allow_pickle=allow_pickle)
    info = read_base_model(base)
    planned = plan_adapter(adapter, info, skip_embeddings=skip_embeddings)
    header = AdapterHeader(
        name=adapter.name,
        alpha=float(adapter.config["lora_alpha"]),
        source="loramux PEFT converter",
        peft_type="LORA+RSLORA" if adapter.config.get("use_rslora") else "LORA",
    )
    return write_gguf_lora(out, planned, info, header, outtype=outtype, progress=progress)
