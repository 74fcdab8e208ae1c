"""What a converter needs to know about the base model, read from its GGUF file alone."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import BaseModelError
from .gguf_header import GgufHeaderError, read_gguf_header


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
    def head_dim(self) -> int:
        """Width of one attention head: ``attention.key_length``, else embedding width / head count."""
        h, arch = self.hparams, self.architecture
        n_head = int(h[f"{arch}.attention.head_count"])
        return int(h.get(f"{arch}.attention.key_length") or int(h[f"{arch}.embedding_length"]) // n_head)

    @property
    def ties_output_to_embeddings(self) -> bool:
        """True when llama.cpp uses token_embd as the output projection (no output.weight)."""
        return "output.weight" not in self.tensor_shapes and "token_embd.weight" in self.tensor_shapes


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> BaseModelInfo:
    import numpy as np

    try:
        header = read_gguf_header(path)
    except (OSError, GgufHeaderError) as exc:
        raise BaseModelError(
            f"cannot read base model {path!r} as GGUF: {exc}; pass a complete GGUF model file (loramux fetch-base writes the default one)"
        ) from exc
    kv = header.metadata
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise BaseModelError(f"base model {path!r} has no general.architecture: is it a GGUF model?")
    if kv.get("general.type") == "adapter":
        raise BaseModelError(f"{path!r} is a GGUF adapter, not a base model: pass the model with --base")
    shapes = {t.name: t.shape for t in header.tensors}
    hparams = {k: v for k, v in kv.items() if isinstance(v, (int, float)) and k.startswith(arch + ".")}
    digest = hashlib.sha256()
    digest.update(arch.encode())
    for t in header.tensors:
        # The shape is written as a tuple of numpy uint64 (what this key was first computed from),
        # so fingerprints cached by earlier versions stay valid.
        digest.update(f"{t.name}:{tuple(np.array(t.shape, dtype=np.uint64))}:{t.tensor_type};".encode())
    emb = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if emb is not None:
        nbytes = _tensor_nbytes(emb, path)
        with open(path, "rb") as f:
            if emb.offset < os.fstat(f.fileno()).st_size:  # past the end (or past 2^63): nothing to hash
                f.seek(emb.offset)
                digest.update(f.read(min(1 << 20, nbytes)))
    return BaseModelInfo(
        path=Path(path),
        architecture=arch,
        name=str(kv.get("general.name") or Path(path).stem),
        tensor_shapes=shapes,
        hparams=hparams,
        fingerprint=digest.hexdigest()[:16],
    )


def _tensor_nbytes(t, path: str) -> int:
    """Bytes of a tensor's data; BaseModelError for a ggml type gguf-py does not know."""
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.tensor_type)]
    except (ValueError, KeyError) as exc:
        raise BaseModelError(
            f"base model {path!r}: tensor {t.name!r} has ggml type {t.tensor_type}, which gguf-py does not know: "
            "corrupt file, or a newer format (upgrade the gguf package)"
        ) from exc
    count = 1
    for d in t.shape:
        count *= d
    return count // block * type_size


def read_base_model(path: str | os.PathLike) -> BaseModelInfo:
    """Read (and cache) the facts about a base GGUF the converters need."""
    p = Path(path)
    if not p.is_file():
        raise BaseModelError(f"base model {str(p)!r} does not exist (loramux fetch-base writes the default one)")
    st = p.stat()
    return _read(str(p.resolve()), st.st_mtime_ns, st.st_size)
