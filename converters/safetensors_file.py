"""A strict reader of .safetensors files into float32 numpy arrays.

Written here (not safetensors.numpy) because numpy has no bfloat16 and because a
converter must say precisely what is wrong with a truncated or corrupt file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .errors import AdapterError

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element)
_DTYPES: dict[str, tuple[str, int]] = {
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # widened to float32 by shifting into the high half
    "F64": ("<f8", 8),
}
_MAX_DIMS = 32  # numpy allows 64; LoRA matrices have 2


def _is_index(value: object) -> bool:
    """A JSON integer usable as a size or an offset (not a bool, not negative)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(where: str, name: str, info: object, body_len: int) -> tuple[str, list[int], int, int]:
    """Validate one header entry; return (dtype, shape, start, end) or raise AdapterError naming the tensor."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
    except (KeyError, TypeError, IndexError) as exc:
        raise AdapterError(
            f"{where}: tensor {name!r} has a malformed header entry (needs dtype, shape, data_offsets): corrupt file"
        ) from exc
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise AdapterError(f"{where}: tensor {name!r} has dtype {dtype!r}; LoRA weights must be F32, F16 or BF16")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_index(d) for d in shape):
        raise AdapterError(
            f"{where}: tensor {name!r} has shape {shape!r}; a shape is a list of at most {_MAX_DIMS} non-negative integers: corrupt file"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
        raise AdapterError(
            f"{where}: tensor {name!r} has data_offsets {offsets!r}; expected [start, end] as non-negative integers: corrupt file"
        )
    start, end = offsets
    if not start <= end <= body_len:
        raise AdapterError(
            f"{where}: tensor {name!r} lies past the end of the file (bytes {start}-{end} of {body_len}): truncated download?"
        )
    item = _DTYPES[dtype][1]
    need = math.prod(shape) * item
    if end - start != need or math.prod(max(d, 1) for d in shape) * item >= 2**62:
        raise AdapterError(f"{where}: tensor {name!r} holds {end - start} bytes, its shape {shape} needs {need}: corrupt file")
    return dtype, shape, start, end


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return ``({name: float32 array}, {name: source dtype})``; raise AdapterError on any defect.

    Tensors are read one at a time (seek + read), so the file's bytes are never held whole
    beside the float32 arrays: peak memory is the arrays plus one tensor's bytes.
    """
    where = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise AdapterError(f"{where}: file is {size} bytes, too short to be safetensors (truncated?)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise AdapterError(f"{where}: header claims {header_len} bytes but the file has {size - 8}: truncated or not safetensors")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4300+ digit numbers, deep nesting
            raise AdapterError(f"{where}: header is not valid JSON ({str(exc)[:200]}): corrupt file") from exc
        if not isinstance(header, dict):
            raise AdapterError(f"{where}: header is not a JSON object: corrupt file")
        body_start, body_len = 8 + header_len, size - 8 - header_len
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, start, end = _entry(where, name, info, body_len)
            np_dtype = _DTYPES[dtype][0]
            f.seek(body_start + start)
            raw = np.frombuffer(f.read(end - start), dtype=np_dtype)
            if dtype == "BF16":
                arr = raw.astype(np.uint32)
                arr <<= 16
                arr = arr.view(np.float32)
            else:
                arr = raw.astype(np.float32)
            arrays[name] = arr.reshape(shape)
            dtypes[name] = dtype
    return arrays, dtypes
