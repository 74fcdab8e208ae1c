"""A fast reader of a GGUF file's header: scalar metadata and tensor infos, nothing else.

gguf-py's ``GGUFReader`` builds a numpy view for every element of every metadata
array; on a model with a 49k-token vocabulary that is about 3.5 s of CPU before the
first tensor is seen, which dominated converting one adapter from the command line.
The converters need only scalars and tensor names/shapes/types, so this reader skips
array contents by length. Value type codes and tensor types come from gguf-py's
constants (``GGUFValueType``, ``GGMLQuantizationType``), so the file format is still
written down in one place.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ggml ``ne`` (innermost first), type and absolute data offset."""

    name: str
    shape: tuple[int, ...]
    tensor_type: int
    offset: int  # absolute, in bytes from the start of the file


@dataclass(frozen=True)
class GgufHeader:
    """Scalar metadata (arrays are skipped: value None) and tensor infos of a GGUF file."""

    version: int
    metadata: dict[str, object]
    tensors: list[TensorInfo]
    data_offset: int


class GgufHeaderError(ValueError):
    """The file is not a (little-endian, version 2 or 3) GGUF file, or its header is cut short."""


def _scalar_formats() -> dict[int, str]:
    from gguf import GGUFValueType as T

    return {
        T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
        T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d",
    }


def read_gguf_header(path: str | os.PathLike) -> GgufHeader:
    """Parse the header of ``path``; raise :class:`GgufHeaderError` on anything malformed."""
    from gguf import GGUFValueType

    formats = _scalar_formats()
    sizes = {t: struct.calcsize(f) for t, f in formats.items()}
    string_t, array_t = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # empty file
            raise GgufHeaderError("empty file") from exc
    with buf:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(buf):
                raise GgufHeaderError(f"header cut short at byte {pos} of {len(buf)}: truncated file?")
            value = struct.unpack_from(fmt, buf, pos)
            pos += size
            return value[0] if len(value) == 1 else value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > len(buf):
                raise GgufHeaderError(f"header cut short: a string of {n} bytes at byte {pos} runs past the end ({len(buf)} bytes): truncated file?")
            s = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def skip_value(vtype: int) -> None:
            nonlocal pos
            if vtype in sizes:
                pos += sizes[vtype]
            elif vtype == string_t:
                n = take("<Q")  # the length prefix, then skip the bytes
                pos += n
            elif vtype == array_t:
                itype, count = take("<I"), take("<Q")
                if itype in sizes:
                    pos += sizes[itype] * count
                else:
                    for _ in range(count):
                        skip_value(itype)
            else:
                raise GgufHeaderError(f"unknown metadata value type {vtype} at byte {pos}")
            if pos > len(buf):
                raise GgufHeaderError(f"header cut short: metadata runs past the end of the file ({len(buf)} bytes): truncated file?")

        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GgufHeaderError("no GGUF magic at the start of the file")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            raise GgufHeaderError(f"GGUF version {version} (big-endian file?); versions 2 and 3 are read")
        n_tensors, n_kv = take("<Q"), take("<Q")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            vtype = take("<I")
            if vtype in formats:
                metadata[key] = take(formats[vtype])
            elif vtype == string_t:
                metadata[key] = string()
            else:
                skip_value(vtype)
                metadata[key] = None
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I")
            if n_dims > 8:
                raise GgufHeaderError(f"tensor {name!r} claims {n_dims} dimensions")
            shape = tuple(take("<Q") for _ in range(n_dims))
            infos.append((name, shape, take("<I"), take("<Q")))
        alignment = metadata.get("general.alignment") or DEFAULT_ALIGNMENT
        if not isinstance(alignment, int) or alignment & (alignment - 1):
            raise GgufHeaderError(f"general.alignment {alignment!r} is not a power of two")
        data_offset = pos + (-pos % alignment)
        tensors = [TensorInfo(n, s, t, data_offset + o) for n, s, t, o in infos]
        return GgufHeader(version=version, metadata=metadata, tensors=tensors, data_offset=data_offset)
