"""Which files of a folder were opened while a block ran, seen by the kernel (Linux inotify).

llama.cpp opens adapter files from C (``llama_adapter_lora_init``), below anything Python could
patch, so the tests ask the kernel: an ``IN_OPEN`` watch on the folder reports every open of a
file in it, by any code of the process.

>>> with FileOpens(folder) as opens:
...     pool.load(path)
>>> opens.names   # the file names opened in the folder during the block
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
from pathlib import Path

IN_OPEN = 0x00000020
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class FileOpens:
    """Collect the names of files opened in ``folder`` during a ``with`` block (Linux only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.names: list[str] = []
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._fd = -1

    def __enter__(self) -> "FileOpens":
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if self._libc.inotify_add_watch(self._fd, str(self.folder).encode(), IN_OPEN) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch({self.folder}) failed")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            while select.select([self._fd], [], [], 0.2)[0]:
                data = os.read(self._fd, 1 << 16)
                at = 0
                while at < len(data):
                    _, mask, _, n = _EVENT.unpack_from(data, at)
                    name = data[at + _EVENT.size : at + _EVENT.size + n].rstrip(b"\0").decode()
                    if mask & IN_OPEN and name:
                        self.names.append(name)
                    at += _EVENT.size + n
        finally:
            os.close(self._fd)
