"""The adapters of a pool: where they come from, their names, and the cache of converted PEFT folders.

An adapter is a GGUF LoRA file or a PEFT folder; a folder of those is scanned one level deep.
PEFT folders are converted with the project's one converter
(:func:`loramux.converters.convert_peft_to_gguf`) into a cache under
``loramux.base_model.cache_dir() / "adapters"``, keyed by a hash of the PEFT files, the base
model's fingerprint, the converter's sources and its settings; the converter writes atomically,
so a conversion killed half-way never leaves a file that a later load would use.
:func:`cached_conversion` converts under an exclusive lock on the cache folder (processes
sharing a cache convert one at a time; the kernel drops the lock of a killed process), and
removes, under that lock, the temporary ``.*.partial`` files that a killed conversion left.

:class:`PinnedFiles` keeps a private copy of every GGUF file a pool loaded, and llama.cpp
reads that copy: the pool frees an adapter's llama.cpp tensors once the per-sequence mixer
holds its own copy and loads them again from the file at the next registration, so a file
deleted or replaced on disk after the load must not be read again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from loramux.adapter_file import file_sha256
from loramux.base_model import cache_dir
from loramux.converters import BaseModelInfo, convert_peft_to_gguf
from loramux.errors import AdapterError

# Part of every cache key, with a hash of the converter's source files (so a changed converter
# never serves an old conversion); bump to invalidate every cached conversion by hand.
CONVERTER_CACHE_VERSION = "1"
PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PARTIAL_GLOB = ".*.partial"  # the temporary files of loramux.converters.atomic.atomic_output
LOCK_NAME = ".lock"


class AdapterSkippedWarning(UserWarning):
    """An adapter found in a folder was not loaded (the message names it and says why)."""


@dataclass(frozen=True)
class PoolAdapter:
    """One adapter loaded in the pool."""

    name: str
    source: Path  # what was given: a GGUF file or a PEFT folder
    gguf_path: Path  # the file llama.cpp loaded (the cached conversion for a PEFT folder)
    sha256: str  # of the GGUF bytes: the identity of the weights
    from_peft: bool
    skip_embeddings: bool  # converted with skip_embeddings=True (an embedding LoRA, if any, was dropped)
    n_modules: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class SkippedAdapter:
    """An adapter of a folder that was not loaded, and why."""

    name: str
    source: Path
    reason: str


@dataclass
class LoadReport:
    """What :meth:`AdapterPool.load_adapters` loaded and skipped."""

    loaded: list[PoolAdapter] = field(default_factory=list)
    skipped: list[SkippedAdapter] = field(default_factory=list)


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / PEFT_CONFIG).is_file()


def find_adapter_sources(path: str | os.PathLike) -> tuple[list[Path], bool]:
    """Adapters under ``path`` and whether they came from scanning a folder.

    A ``.gguf`` file or a PEFT folder is itself one adapter (not scanned); any other folder is
    scanned one level deep for ``*.gguf`` files and PEFT folders (sorted by name).
    """
    p = Path(path)
    if p.is_file():
        return [p], False
    if is_peft_folder(p):
        return [p], False
    if not p.is_dir():
        raise AdapterError(f"adapter path {p} does not exist")
    found = sorted(c for c in p.iterdir() if (c.is_file() and c.suffix == ".gguf") or is_peft_folder(c))
    if not found:
        raise AdapterError(f"no adapters in {p}: expected *.gguf LoRA files or PEFT folders (with {PEFT_CONFIG})")
    return found, True


def adapter_name(source: Path) -> str:
    """The name an adapter is addressed by: a GGUF file's stem or a PEFT folder's name."""
    return source.stem if source.is_file() else source.name


@functools.lru_cache(maxsize=1)
def converter_fingerprint() -> str:
    """Hash of the converter package's Python sources."""
    import loramux.converters as converters

    h = hashlib.sha256()
    for f in sorted(Path(converters.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def peft_cache_key(folder: Path, base: BaseModelInfo, *, outtype: str, skip_embeddings: bool) -> str:
    """Hash of the PEFT files, the base model's fingerprint, the converter's sources and settings."""
    h = hashlib.sha256()
    h.update(f"loramux-peft-cache/{CONVERTER_CACHE_VERSION};converter={converter_fingerprint()};base={base.fingerprint};".encode())
    h.update(f"outtype={outtype};skip_embeddings={bool(skip_embeddings)};".encode())
    for fname in (PEFT_CONFIG, *_PEFT_WEIGHT_FILES):
        f = folder / fname
        if f.is_file():
            h.update(f"{fname}:{file_sha256(f)};".encode())
    return h.hexdigest()


def converted_adapter_path(folder: Path, base: BaseModelInfo, *, outtype: str = "f16", skip_embeddings: bool = False) -> Path:
    """Where the cached GGUF conversion of a PEFT folder lives (it may not exist yet)."""
    key = peft_cache_key(folder, base, outtype=outtype, skip_embeddings=skip_embeddings)
    return cache_dir() / "adapters" / f"{folder.name}-{key[:24]}.gguf"


@contextlib.contextmanager
def cache_lock(folder: Path):
    """Hold an exclusive lock on the conversion cache ``folder`` (``flock``; released if the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): conversions are still atomic, only not serialised
        yield
        return
    with open(folder / LOCK_NAME, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete the temporary files of conversions that died half-way (call it holding :func:`cache_lock`)."""
    removed = []
    for partial in folder.glob(PARTIAL_GLOB):
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
            removed.append(partial)
    return removed


def cached_conversion(folder: Path, base_path: Path, target: Path, *, outtype: str, skip_embeddings: bool, allow_pickle: bool) -> Path:
    """``target`` (a path of :func:`converted_adapter_path`), converting the PEFT ``folder`` into it if needed.

    Under :func:`cache_lock`: leftovers of killed conversions are removed first, and a file at
    ``target`` is whole (the converter renames it into place only once written)."""
    with cache_lock(target.parent):
        remove_stale_partials(target.parent)
        if not target.is_file():
            convert_peft_to_gguf(folder, base_path, target, outtype=outtype, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle)
    return target


class PinnedFiles:
    """Private, read-only copies of the GGUF files an :class:`~loramux.AdapterPool` loaded.

    :meth:`pin` copies a file into a private temporary folder and checks that the copy has the
    bytes the pool validated; :meth:`unpin` deletes one copy, :meth:`close` all of them. The
    folder's name holds the process id: folders left by killed processes are removed by the next
    pool that pins a file.
    """

    PREFIX = "loramux-adapters-"

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._lock = threading.Lock()

    def pin(self, path: Path, sha256: str, name: str) -> Path:
        """A private copy of ``path`` (adapter ``name``); AdapterError if its bytes are no longer ``sha256``."""
        with self._lock:
            if self._dir is None:
                remove_orphaned_pins()
                self._dir = Path(tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-"))
            fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".gguf", dir=self._dir)
        os.close(fd)
        copy = Path(tmp)
        try:
            shutil.copyfile(path, copy)
            if file_sha256(copy) != sha256:
                raise AdapterError(f"adapter {name!r} ({path}) changed on disk while it was being loaded; load it again")
            copy.chmod(0o400)
        except BaseException:
            self.unpin(copy)
            raise
        return copy

    def unpin(self, copy: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            copy.unlink()

    def close(self) -> None:
        with self._lock:
            folder, self._dir = self._dir, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_orphaned_pins() -> list[Path]:
    """Delete the :class:`PinnedFiles` folders whose process is gone (killed before it could close)."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{PinnedFiles.PREFIX}*-*"):
        pid = folder.name[len(PinnedFiles.PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


__all__ = [
    "AdapterSkippedWarning",
    "CONVERTER_CACHE_VERSION",
    "LoadReport",
    "PEFT_CONFIG",
    "PinnedFiles",
    "PoolAdapter",
    "SkippedAdapter",
    "adapter_name",
    "cache_lock",
    "cached_conversion",
    "converted_adapter_path",
    "converter_fingerprint",
    "find_adapter_sources",
    "is_peft_folder",
    "peft_cache_key",
    "remove_orphaned_pins",
    "remove_stale_partials",
]
