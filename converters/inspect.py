"""Describe what an adapter holds: a PEFT folder or a GGUF LoRA file."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import AdapterError
from .peft_checkpoint import load_peft_adapter
from .safetensors_file import read_safetensors


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def describe_peft(path: Path) -> dict[str, Any]:
    adapter = load_peft_adapter(path)
    _, dtypes = read_safetensors(path / "adapter_model.safetensors")
    return {
        "path": str(path),
        "format": "peft",
        "type": "LORA" + ("+rsLoRA" if adapter.config.get("use_rslora") else ""),
        "modules": len(adapter.modules),
        "ranks": adapter.ranks,
        "alphas": adapter.alphas,
        "scalings": sorted({round(m.scaling, 6) for m in adapter.modules}),
        "targets": adapter.targets,
        "embedding_lora": any(m.kind == "embedding" for m in adapter.modules),
        "dtypes": dict(Counter(dtypes.values())),
        "size_bytes": _folder_size(path),
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
    }


def describe_gguf(path: Path) -> dict[str, Any]:
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:
        raise AdapterError(f"{path}: cannot read as GGUF: {exc}") from exc

    def kv(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None or not field.types:
            return None
        if field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        return field.parts[field.data[0]].tolist()[0]

    if kv("general.type") != "adapter":
        raise AdapterError(f"{path}: general.type is {kv('general.type')!r}, not 'adapter': this is not a GGUF LoRA adapter")
    ranks = Counter()
    targets = set()
    for t in reader.tensors:
        if t.name.endswith(".lora_b"):
            ranks[int(t.shape[0])] += 1
            base = t.name[: -len(".lora_b")]
            parts = base.split(".")
            targets.add(parts[-2] if base.startswith("blk.") else parts[0])
    return {
        "path": str(path),
        "format": "gguf",
        "type": kv("adapter.type"),
        "architecture": kv("general.architecture"),
        "name": kv("general.name"),
        "alpha": kv("adapter.lora.alpha"),
        "modules": sum(ranks.values()),
        "ranks": sorted(ranks),
        "targets": sorted(targets),
        "dtypes": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "size_bytes": os.path.getsize(path),
        "base_fingerprint": kv("loramux.base_fingerprint"),
    }


def describe_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description of a PEFT folder or a GGUF LoRA adapter."""
    p = Path(path)
    if p.is_dir():
        return describe_peft(p)
    if p.is_file():
        return describe_gguf(p)
    raise AdapterError(f"{p}: no such file or folder")
