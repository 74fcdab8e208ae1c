"""A strict reader of .safetensors files into float32 numpy arrays.

Written here (not safetensors.numpy) because numpy has no bfloat16 and because a
converter must say precisely what is wrong with a truncated or corrupt file.
"""
from __future__ import annotations

import json
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
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{where}: header is not valid JSON ({exc}): corrupt file") from exc
        if not isinstance(header, dict):
            raise AdapterError(f"{where}: header is not a JSON object: corrupt file")
        body_start, body_len = 8 + header_len, size - 8 - header_len
        arrays: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise AdapterError(f"{where}: tensor {name!r} has a malformed header entry: corrupt file") from exc
            if dtype not in _DTYPES:
                raise AdapterError(f"{where}: tensor {name!r} has dtype {dtype}; LoRA weights must be F32, F16 or BF16")
            np_dtype, item = _DTYPES[dtype]
            count = int(np.prod(shape)) if shape else 1
            if not (0 <= start <= end <= body_len):
                raise AdapterError(f"{where}: tensor {name!r} lies past the end of the file (bytes {start}-{end} of {body_len}): truncated download?")
            if end - start != count * item:
                raise AdapterError(f"{where}: tensor {name!r} holds {end - start} bytes, its shape {shape} needs {count * item}: corrupt file")
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
