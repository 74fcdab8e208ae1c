"""Read a PEFT LoRA checkpoint folder into per-module (A, B, rank, alpha, scaling) records."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import AdapterError, UnsupportedAdapterError
from .peft_config import load_config, pattern_value
from .safetensors_file import read_safetensors
from .scale import peft_scaling

# PEFT key suffix -> (which matrix, module kind). save_pretrained strips the adapter name.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass
class LoraModule:
    """One adapted module: PEFT's arrays (float32) and the scale PEFT applies."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj"
    kind: Literal["linear", "embedding"]
    A: np.ndarray  # (r, in); for embeddings (r, vocab)
    B: np.ndarray  # (out, r); for embeddings (dim, r)
    rank: int
    alpha: float
    scaling: float
    source_dtype: str

    def delta(self) -> np.ndarray:
        """PEFT's delta in the base weight's (out, in) layout; for embeddings (vocab, dim)."""
        d = self.scaling * (self.B.astype(np.float64) @ self.A.astype(np.float64))
        return d.T if self.kind == "embedding" else d


@dataclass
class PeftAdapter:
    """A whole PEFT LoRA checkpoint."""

    path: Path
    name: str
    config: dict[str, Any]
    modules: list[LoraModule] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules})

    @property
    def targets(self) -> list[str]:
        return sorted({m.name.rsplit(".", 1)[-1] for m in self.modules})


def _load_tensors(folder: Path, allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        return read_safetensors(st)
    binary = folder / "adapter_model.bin"
    if binary.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{binary}: pickle checkpoints can run arbitrary code when loaded; re-save the adapter with "
                "save_pretrained(safe_serialization=True), or pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)"
            )
        return _load_pickle(binary)
    raise AdapterError(f"{folder}: no adapter_model.safetensors (nor adapter_model.bin)")


def _load_pickle(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        import torch
    except ImportError as exc:
        raise AdapterError(f"{path}: reading a pickle checkpoint needs torch (pip install 'loramux[train]')") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterError(f"{path}: torch.load(weights_only=True) refused or failed: {exc}") from exc
    arrays = {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
    return arrays, {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}


def _refuse_foreign_keys(folder: Path, names: list[str]) -> None:
    for name in names:
        if "lora_magnitude_vector" in name:
            raise UnsupportedAdapterError(
                f"{folder}: tensor {name!r} is a DoRA magnitude vector; llama.cpp LoRA adapters cannot express DoRA. "
                "Merge the adapter into the base model with PEFT's merge_and_unload() and convert the merged model instead"
            )
        if name.endswith(".bias"):
            raise UnsupportedAdapterError(
                f"{folder}: tensor {name!r} is a trained bias, which a LoRA adapter file cannot carry; retrain with "
                "bias='none' (and lora_bias=false), or merge the adapter into the base model with PEFT's merge_and_unload()"
            )
        if not _KEY.match(name):
            raise UnsupportedAdapterError(
                f"{folder}: tensor {name!r} is not a LoRA A/B matrix (modules_to_save or another method?); only plain LoRA weights can be converted"
            )


def load_peft_adapter(path: str | Path, *, allow_pickle: bool = False) -> PeftAdapter:
    """Read and validate a PEFT LoRA folder. Raises AdapterError / UnsupportedAdapterError."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder; pass the folder PEFT's save_pretrained() wrote")
    config = load_config(folder)
    arrays, dtypes = _load_tensors(folder, allow_pickle)
    if not arrays:
        raise AdapterError(f"{folder}: the checkpoint holds no tensors")
    _refuse_foreign_keys(folder, list(arrays))

    parts: dict[str, dict[str, str]] = {}
    for key in arrays:
        m = _KEY.match(key)
        parts.setdefault(m["module"], {})[m["part"]] = key

    use_rslora = bool(config.get("use_rslora"))
    adapter = PeftAdapter(path=folder, name=folder.name, config=config)
    for module, found in sorted(parts.items(), key=lambda kv: _natural_key(kv[0])):
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a_key = found.get("lora_embedding_A" if embedding else "lora_A")
        b_key = found.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise AdapterError(f"{folder}: module {module!r} has only one of its two LoRA matrices ({sorted(found.values())})")
        A, B = arrays[a_key], arrays[b_key]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"{folder}: module {module!r} has A {list(A.shape)} and B {list(B.shape)}, which do not form a rank-r pair (A: r x in, B: out x r)"
            )
        for key, arr in ((a_key, A), (b_key, B)):
            if not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise AdapterError(f"{folder}: tensor {key!r} holds {bad} NaN/Inf values; the checkpoint is broken (diverged training?)")
        rank = int(A.shape[0])
        declared = int(pattern_value(config.get("rank_pattern"), module, config["r"]))
        if declared != rank:
            raise AdapterError(f"{folder}: module {module!r} has rank {rank} but the config says r={declared} (rank_pattern / r)")
        alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        adapter.modules.append(
            LoraModule(
                name=module,
                kind="embedding" if embedding else "linear",
                A=A,
                B=B,
                rank=rank,
                alpha=alpha,
                scaling=peft_scaling(alpha, rank, use_rslora),
                source_dtype=dtypes[a_key],
            )
        )
    return adapter


def _natural_key(name: str) -> list[Any]:
    """Sort key with digit runs compared as numbers ("layers.2" before "layers.10").

    A run is compared as (length without leading zeros, digits), not int(): int() refuses runs of
    more than 4300 digits, and str.isdigit() is true of characters int() cannot read ("²").
    """
    return [(len(t.lstrip("0")), t.lstrip("0")) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name))]
