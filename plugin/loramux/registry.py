"""AdapterRegistry: which named adapters a pool holds, and their lifecycle from a path to a slot.

The registry turns a path (a GGUF LoRA file, a PEFT folder, a folder of those) into a checked,
pinned GGUF and a llama.cpp adapter handle, and hands the handle to the engine, which owns every
handle from then on (:meth:`loramux.engine.Engine.add_adapters`): the engine puts it into one slot
of its per-sequence pool, reading that adapter only, and frees it when it is retired. The
registry keeps what a caller may read (:class:`~loramux.adapters.PoolAdapter`: name, source,
sha256, ranks) and the pinned copies of the files llama.cpp reads.

Names are the identity of weights: loading the same weights under the same name again returns the
loaded adapter; other weights under a used name are refused. A folder's adapters are converted,
checked and put into the pool together (one library call); an adapter the runtime cannot express
is skipped there with an :class:`~loramux.adapters.AdapterSkippedWarning`, while an adapter given
by its own path is strict.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from loramux.adapter_file import check_gguf_adapter
from loramux.adapters import (
    PEFT_CONFIG,
    AdapterSkippedWarning,
    LoadReport,
    PinnedFiles,
    PoolAdapter,
    SkippedAdapter,
    adapter_name,
    cached_conversion,
    converted_adapter_path,
    find_adapter_sources,
    is_peft_folder,
)
from loramux.converters import BaseModelInfo
from loramux.errors import AdapterError, UnsupportedAdapterError
from loramux.llama_runtime import LoraAdapterHandle
from loramux.mix import Mix, MixLike

# an adapter ready to enter the pool: its handle (not yet the engine's) and what callers see of it
_Prepared = tuple[LoraAdapterHandle, PoolAdapter]


class AdapterRegistry:
    """The named adapters of one engine: load, unload, look up. Thread-safe (one change at a time).

    ``engine`` is the :class:`~loramux.engine.Engine` whose pool the adapters enter; ``model_ptr``
    the ``llama_model *`` they are loaded on; ``base_path`` / ``base_info`` the base GGUF (PEFT
    folders are converted against it)."""

    def __init__(self, engine, model_ptr, base_path: Path, base_info: BaseModelInfo, *, verbose: bool = False) -> None:
        self._engine = engine
        self._model_ptr = model_ptr
        self.base_path = base_path
        self.base_info = base_info
        self._verbose = verbose
        self._adapters: dict[str, PoolAdapter] = {}
        self._pinned = PinnedFiles()  # what llama.cpp reads (and reads again): copies, safe from changes on disk
        self._pin_of: dict[str, Path] = {}
        self._lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        """Names of the loaded adapters, sorted."""
        return sorted(self._adapters)

    @property
    def adapters(self) -> Mapping[str, PoolAdapter]:
        """A snapshot of the loaded adapters by name."""
        return dict(self._adapters)

    def resolve_mix(self, mix: MixLike) -> Mix:
        """``mix`` as a :class:`Mix`, every named adapter checked against the loaded ones."""
        return Mix.coerce(mix).check_known(self._adapters)

    def load(self, source: Path, *, name: str | None, skip_embeddings: bool, allow_pickle: bool, outtype: str) -> PoolAdapter:
        """Load one adapter (strict: it loads or raises); see :meth:`loramux.AdapterPool.load`."""
        with self._lock:
            prepared = self._prepare(source, name=name, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle, outtype=outtype)
            if isinstance(prepared, PoolAdapter):
                return prepared
            self._enter([prepared])
            return prepared[1]

    def load_many(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        skip_embeddings: bool,
        allow_pickle: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> LoadReport:
        """Load files, PEFT folders and folders of those; all enter the pool in one change."""
        sources: list[tuple[Path, bool]] = []
        for p in paths:
            found, scanned = find_adapter_sources(p)
            sources.extend((s, scanned) for s in found)
        report, new = LoadReport(), []
        with self._lock:
            try:
                for i, (src, scanned) in enumerate(sources):
                    self._load_into(report, new, src, scanned, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle)
                    if progress:
                        progress(i + 1, len(sources))
            except BaseException:
                self._discard(new)
                raise
            if new:
                self._enter(new)
        return report

    def unload(self, name: str) -> None:
        """Take ``name`` out at once for new requests; the engine frees it once no request uses it. Blocks until then."""
        with self._lock:
            if name not in self._adapters:
                raise AdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.names) or 'none'})")
            self._adapters = {n: a for n, a in self._adapters.items() if n != name}
            pin = self._pin_of.pop(name)
            self._engine.retire_adapter(name, lambda: self._pinned.unpin(pin))

    def close(self) -> None:
        """Delete the pinned copies (after the engine freed the handles)."""
        self._pinned.close()

    # --- one adapter, from a path to a handle --------------------------------------------------
    def _prepare(self, src: Path, *, name: str | None, skip_embeddings: bool, allow_pickle: bool, outtype: str) -> PoolAdapter | _Prepared:
        """The loaded PoolAdapter of these weights, or (handle, info) of a new one not in the pool yet."""
        if not src.exists():
            raise AdapterError(f"adapter {src} does not exist")
        name = name or adapter_name(src)
        Mix({name: 1.0})  # the name must be usable in a mix
        gguf_path = self._gguf_for(src, outtype=outtype, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle)
        facts = check_gguf_adapter(gguf_path, self.base_info, name=name)
        existing = self._adapters.get(name)
        if existing is not None:
            if existing.sha256 == facts.sha256:
                return existing
            raise AdapterError(
                f"adapter name {name!r} is already used for other weights ({existing.source}); "
                f"a name is never reused for different weights: load {src} under another name"
            )
        pinned = self._pinned.pin(gguf_path, facts.sha256, name)
        try:
            handle = self._engine.call(
                lambda: LoraAdapterHandle(self._model_ptr, pinned, name, verbose=self._verbose, adapts_embeddings=facts.adapts_embeddings)
            )
        except BaseException:
            self._pinned.unpin(pinned)
            raise
        info = PoolAdapter(
            name=name,
            source=src,
            gguf_path=gguf_path,
            sha256=facts.sha256,
            from_peft=src.is_dir(),
            skip_embeddings=bool(src.is_dir() and skip_embeddings),
            n_modules=facts.n_modules,
            ranks=facts.ranks,
        )
        return handle, info

    def _gguf_for(self, src: Path, *, outtype: str, skip_embeddings: bool, allow_pickle: bool) -> Path:
        if not src.is_dir():
            return src
        if not is_peft_folder(src):
            raise AdapterError(f"{src} is a folder without {PEFT_CONFIG}: not a PEFT adapter (use load_adapters for folders of adapters)")
        gguf_path = converted_adapter_path(src, self.base_info, outtype=outtype, skip_embeddings=skip_embeddings)
        if not gguf_path.is_file():  # the converter writes atomically: a file here is whole
            cached_conversion(src, self.base_path, gguf_path, outtype=outtype, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle)
        return gguf_path

    def _load_into(self, report: LoadReport, new: list[_Prepared], src: Path, scanned: bool, **kwargs: Any) -> None:
        try:
            prepared = self._prepare(src, name=None, outtype="f16", **kwargs)
        except UnsupportedAdapterError as exc:
            if not scanned:
                raise
            skipped = SkippedAdapter(adapter_name(src), src, str(exc))
            report.skipped.append(skipped)
            warnings.warn(f"skipped adapter {skipped.name!r}: {exc}", AdapterSkippedWarning, stacklevel=4)
            return
        if isinstance(prepared, PoolAdapter):
            report.loaded.append(prepared)
        elif any(info.name == prepared[1].name for _, info in new):
            self._discard([prepared])
            raise AdapterError(f"two adapters named {prepared[1].name!r} in one load ({src}); rename one")
        else:
            new.append(prepared)
            report.loaded.append(prepared[1])

    def _enter(self, new: list[_Prepared]) -> None:
        """Hand ``new`` to the engine (one pool change; it owns the handles from here, freed on failure)."""
        try:
            self._engine.add_adapters({info.name: h for h, info in new})
        except BaseException:
            for h, _ in new:
                self._pinned.unpin(h.path)
            raise
        self._adapters = self._adapters | {info.name: info for _, info in new}
        self._pin_of |= {info.name: h.path for h, info in new}

    def _discard(self, prepared: list[_Prepared]) -> None:
        """Free handles that never entered the pool (on the engine's thread, which loads and frees them)."""
        for h, _ in prepared:
            self._engine.call(h.free)
            self._pinned.unpin(h.path)


__all__ = ["AdapterRegistry"]
