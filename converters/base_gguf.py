"""What a converter needs to know about the base model, read from its GGUF file alone."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import BaseModelError


@dataclass(frozen=True)
class BaseModelInfo:
    """Architecture, tensor shapes and a few hyperparameters of a base GGUF."""

    path: Path
    architecture: str
    name: str
    # tensor name -> ggml ne (innermost first), e.g. blk.0.attn_q.weight -> (576, 576)
    tensor_shapes: dict[str, tuple[int, ...]]
    # integer/float hyperparameters (llama.attention.head_count, ...)
    hparams: dict[str, int | float]
    fingerprint: str

    @property
    def ties_output_to_embeddings(self) -> bool:
        """True when llama.cpp uses token_embd as the output projection (no output.weight)."""
        return "output.weight" not in self.tensor_shapes and "token_embd.weight" in self.tensor_shapes


def _field_value(field):
    import gguf

    if not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    return field.parts[field.data[0]].tolist()[0]


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> BaseModelInfo:
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError / struct errors on bad files
        raise BaseModelError(f"cannot read base model {path!r} as GGUF: {exc}") from exc
    kv = {name: _field_value(f) for name, f in reader.fields.items()}
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise BaseModelError(f"base model {path!r} has no general.architecture: is it a GGUF model?")
    if kv.get("general.type") == "adapter":
        raise BaseModelError(f"{path!r} is a GGUF adapter, not a base model: pass the model with --base")
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    hparams = {k: v for k, v in kv.items() if isinstance(v, (int, float)) and k.startswith(arch + ".")}
    digest = hashlib.sha256()
    digest.update(arch.encode())
    for t in reader.tensors:
        digest.update(f"{t.name}:{tuple(t.shape)}:{int(t.tensor_type)};".encode())
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is not None:
        digest.update(bytes(emb.data.reshape(-1).view("uint8")[: 1 << 20]))
    return BaseModelInfo(
        path=Path(path),
        architecture=arch,
        name=str(kv.get("general.name") or Path(path).stem),
        tensor_shapes=shapes,
        hparams=hparams,
        fingerprint=digest.hexdigest()[:16],
    )


def read_base_model(path: str | os.PathLike) -> BaseModelInfo:
    """Read (and cache) the facts about a base GGUF the converters need."""
    p = Path(path)
    if not p.is_file():
        raise BaseModelError(f"base model {str(p)!r} does not exist (loramux fetch-base writes the default one)")
    st = p.stat()
    return _read(str(p.resolve()), st.st_mtime_ns, st.st_size)
