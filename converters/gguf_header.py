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
from typing import Any

from .errors import LoramuxError

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


class GgufHeaderError(LoramuxError, ValueError):
    """The file is not a (little-endian, version 2 or 3) GGUF file, or its header is cut short.

    A LoramuxError (callers catch one base class) and, as before, a ValueError.
    """


MAX_ARRAY_NESTING = 8  # arrays of arrays; llama.cpp itself reads no nested arrays


def _scalar_formats() -> dict[int, str]:
    from gguf import GGUFValueType as T

    return {
        T.UINT8: "<B",
        T.INT8: "<b",
        T.UINT16: "<H",
        T.INT16: "<h",
        T.UINT32: "<I",
        T.INT32: "<i",
        T.FLOAT32: "<f",
        T.BOOL: "<?",
        T.UINT64: "<Q",
        T.INT64: "<q",
        T.FLOAT64: "<d",
    }


class _Cursor:
    """Reads a GGUF header from a buffer; every length and count is checked against the bytes left."""

    def __init__(self, buf: mmap.mmap) -> None:
        from gguf import GGUFValueType

        self.buf, self.pos = buf, 0
        self.formats = _scalar_formats()
        self.sizes = {t: struct.calcsize(f) for t, f in self.formats.items()}
        self.string_t, self.array_t = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)

    def left(self) -> int:
        """Bytes after the cursor."""
        return len(self.buf) - self.pos

    def take(self, fmt: str) -> Any:
        """Unpack ``fmt`` at the cursor and move past it; GgufHeaderError when the file ends first."""
        size = struct.calcsize(fmt)
        if size > self.left():
            raise GgufHeaderError(f"header cut short at byte {self.pos} of {len(self.buf)}: truncated file?")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def count(self, what: str, min_size: int) -> int:
        """A u64 count of items of at least ``min_size`` bytes each, refused when they cannot fit in the file."""
        at, n = self.pos, self.take("<Q")
        if n * min_size > self.left():
            raise GgufHeaderError(
                f"header cut short: it claims {n} {what} at byte {at}, more than the {self.left()} bytes left can hold: truncated or corrupt file?"
            )
        return n

    def string(self) -> str:
        """A length-prefixed UTF-8 string (undecodable bytes replaced)."""
        n = self.count("string bytes", 1)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> object:
        """A scalar or string value; None for an array (skipped)."""
        if vtype in self.formats:
            return self.take(self.formats[vtype])
        if vtype == self.string_t:
            return self.string()
        self.skip(vtype, 0)
        return None

    def min_size(self, vtype: int) -> int:
        """The fewest bytes a value of ``vtype`` takes (an unknown type: as an array header)."""
        return self.sizes.get(vtype) or (8 if vtype == self.string_t else 12)

    def skip(self, vtype: int, depth: int) -> None:
        """Skip a value by its lengths, without building it."""
        if vtype in self.sizes:
            self.take(f"{self.sizes[vtype]}s")
        elif vtype == self.string_t:
            n = self.count("string bytes", 1)  # (not `self.pos += self.count(...)`: count() moves pos first)
            self.pos += n
        elif vtype == self.array_t:
            if depth >= MAX_ARRAY_NESTING:
                raise GgufHeaderError(f"metadata arrays nested more than {MAX_ARRAY_NESTING} deep at byte {self.pos}: corrupt file?")
            itype = self.take("<I")
            n = self.count("array items", self.min_size(itype))
            if itype in self.sizes:
                self.pos += self.sizes[itype] * n
            else:
                for _ in range(n):
                    self.skip(itype, depth + 1)
        else:
            raise GgufHeaderError(f"unknown metadata value type {vtype} at byte {self.pos}")


def read_gguf_header(path: str | os.PathLike) -> GgufHeader:
    """Parse the header of ``path``; raise :class:`GgufHeaderError` (message names the file) on anything malformed."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # empty file
            raise GgufHeaderError(f"{os.fspath(path)}: empty file, not a GGUF model or adapter") from exc
    with buf:
        try:
            return _parse(_Cursor(buf))
        except GgufHeaderError as exc:
            raise GgufHeaderError(f"{os.fspath(path)}: {exc}") from None


def _parse(cur: _Cursor) -> GgufHeader:
    """Magic, version, counts, metadata and tensor infos; messages say where the header went wrong."""
    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise GgufHeaderError("no GGUF magic at the start of the file: not a GGUF file")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GgufHeaderError(f"GGUF version {version} (big-endian file?); versions 2 and 3 are read")
    n_tensors = cur.count("tensors", 8 + 4 + 4 + 8)  # name length, n_dims, type, offset
    n_kv = cur.count("metadata entries", 8 + 4 + 1)  # key length, value type, a 1-byte value
    metadata: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if n_dims > 8:
            raise GgufHeaderError(f"tensor {name!r} claims {n_dims} dimensions")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        infos.append((name, shape, cur.take("<I"), cur.take("<Q")))
    alignment = metadata.get("general.alignment") or DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment & (alignment - 1):
        raise GgufHeaderError(f"general.alignment {alignment!r} is not a power of two")
    data_offset = cur.pos + (-cur.pos % alignment)
    tensors = [TensorInfo(n, s, t, data_offset + o) for n, s, t, o in infos]
    return GgufHeader(version=version, metadata=metadata, tensors=tensors, data_offset=data_offset)
