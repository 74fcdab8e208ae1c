"""loramux.native: llama.cpp with per-sequence adapter mixes (one batch, different mixes).

The patched libllama (built from the llama.cpp that llama-cpp-python vendors, see
``native/README.md``) adds the C API of ``native/include/loramux.h``. This package points
llama-cpp-python at that library before ``llama_cpp`` is imported, so exactly one libllama is
loaded and llama-cpp-python's own API keeps working on top of it.

- :func:`prepare` (cheap, no import of llama_cpp) points llama_cpp at the patched library;
  :func:`available` tells whether the native path is in use (import loramux before llama_cpp);
  :func:`status` says which library and, if not, why.
- :class:`SeqMixer` registers named adapters on a ``llama_context`` and sets a mix per sequence.
- :mod:`loramux.native.teacher`: teacher-forced decoding on a raw context (oracle tests, benchmarks).

The engine that batches requests with different mixes (:mod:`loramux.engine`) is Python on top
of these bindings and lives in the ``loramux`` package.

Without the library everything still works with stock per-context mixes:
:func:`warn_if_unavailable` emits one :class:`NativeUnavailableWarning` per process.
"""

from __future__ import annotations

import threading
import warnings

from loramux.native._loader import NativeStatus

_lock = threading.Lock()
_status: NativeStatus | None = None
_warned = False


class NativeUnavailableWarning(RuntimeWarning):
    """The patched library is missing: requests run one at a time with per-context mixes."""


def prepare() -> bool:
    """Point llama_cpp at the patched library without importing anything heavy (call it early,
    e.g. when ``loramux`` is imported). Returns True when a patched library was found and
    llama_cpp is not imported yet; :func:`available` still does the full check."""
    import os
    import sys

    from loramux.native import _loader

    if "llama_cpp.llama_cpp" in sys.modules:
        return False
    folder = _loader.find_library_dir()
    if folder is None:
        return False
    # even with LORAMUX_NATIVE=0: llama-cpp-python is installed without a library of its own
    # (scripts/setup.sh, LLAMA_BUILD=OFF); the patched library runs stock llama.cpp when no pool
    # is registered, and the native path stays off (available() is False)
    os.environ.setdefault(_loader.LLAMA_ENV, str(folder))
    return not _loader.turned_off()


def status() -> NativeStatus:
    """Load (once) and report the native library: ``available``, ``library`` path, ``reason`` if not."""
    global _status
    with _lock:
        if _status is None:
            from loramux.native import _bindings, _loader

            st = _loader.load()
            if st.available:
                import llama_cpp.llama_cpp as lc

                _bindings.bind(lc._lib)
            _status = st
        return _status


def available() -> bool:
    """True when the patched libllama with the loramux API is the library llama_cpp uses."""
    return status().available


def warn_if_unavailable(stacklevel: int = 2) -> bool:
    """Warn once per process when the native path is not available (not when it was turned off
    with ``LORAMUX_NATIVE=0``); return available()."""
    global _warned
    from loramux.native import _loader

    st = status()
    if not st.available and not _warned and not _loader.turned_off():
        _warned = True
        warnings.warn(
            f"loramux native library not in use ({st.reason}); falling back to stock llama.cpp: "
            "one mix per context, requests run one after another",
            NativeUnavailableWarning,
            stacklevel=stacklevel + 1,
        )
    return st.available


def __getattr__(name: str):
    # SeqMixer imports the bindings lazily, after status() ran.
    if name == "SeqMixer":
        from loramux.native.mixer import SeqMixer

        return SeqMixer
    raise AttributeError(f"module 'loramux.native' has no attribute {name!r}")


__all__ = [
    "NativeStatus",
    "NativeUnavailableWarning",
    "SeqMixer",
    "available",
    "prepare",
    "status",
    "warn_if_unavailable",
]
