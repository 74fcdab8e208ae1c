"""Find the patched libllama and make it the one llama-cpp-python loads.

Exactly one libllama may live in a process: llama-cpp-python loads the library named by
``LLAMA_CPP_LIB_PATH`` (read once, when ``llama_cpp`` is first imported), so this module sets
that variable to the folder of the patched library *before* importing ``llama_cpp``, then checks
that the library llama_cpp really loaded exports the loramux API. The loramux functions are bound
on that same handle, never on a second copy.

Where the patched library is looked for, first hit wins:

1. ``LORAMUX_NATIVE_LIB_DIR`` (a folder holding ``libllama.so`` / ``libllama.dylib`` / ``llama.dll``);
2. ``loramux/native/lib`` inside the installed package (``pip install`` builds it there), also
   through every ``sys.path`` entry (editable installs keep built files in site-packages);
3. ``build/native/lib`` of a source checkout (``scripts/build_native.sh``).

``LORAMUX_NATIVE=0`` turns the native path off (stock llama.cpp, per-context mixes).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV_LIB_DIR = "LORAMUX_NATIVE_LIB_DIR"
ENV_SWITCH = "LORAMUX_NATIVE"
LLAMA_ENV = "LLAMA_CPP_LIB_PATH"
API_VERSION = 6  # LORAMUX_API_VERSION in native/include/loramux.h (tests/test_native_abi.py checks)


def library_file_names() -> tuple[str, ...]:
    if sys.platform == "win32":
        return ("llama.dll", "libllama.dll")
    if sys.platform == "darwin":
        return ("libllama.dylib", "libllama.so")
    return ("libllama.so",)


def _has_library(folder: Path) -> bool:
    return any((folder / n).is_file() for n in library_file_names())


def candidate_dirs() -> list[Path]:
    """Folders searched for the patched library, in order (see the module docstring)."""
    env = os.environ.get(ENV_LIB_DIR)
    if env:
        return [Path(env)]
    dirs = [HERE / "lib"]
    for entry in sys.path:
        if entry:
            dirs.append(Path(entry) / "loramux" / "native" / "lib")
    dirs.append(HERE.parent / "build" / "native" / "lib")
    seen, out = set(), []
    for d in dirs:
        key = str(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def find_library_dir() -> Path | None:
    for d in candidate_dirs():
        if _has_library(d):
            return d.resolve()
    return None


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native per-sequence path is usable, the library in use, and why not."""

    available: bool
    library: str | None
    reason: str


def _check_handle(lib, where: str) -> NativeStatus:
    name = getattr(lib, "_name", where)
    if not hasattr(lib, "loramux_api_version"):
        return NativeStatus(False, name, f"the libllama llama_cpp loaded ({name}) is stock llama.cpp without the loramux API")
    import ctypes

    fn = lib.loramux_api_version
    fn.argtypes, fn.restype = [], ctypes.c_int32
    version = fn()
    if version != API_VERSION:
        return NativeStatus(False, name, f"{name} has loramux API version {version}, this package needs {API_VERSION}: rebuild it")
    return NativeStatus(True, name, "")


def turned_off() -> bool:
    """True when ``LORAMUX_NATIVE=0`` (or false/no/off) turns the native path off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def load() -> NativeStatus:
    """Point llama_cpp at the patched library (if llama_cpp is not imported yet), import it, check it."""
    if turned_off():
        return NativeStatus(False, None, f"turned off with {ENV_SWITCH}=0")
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is None:
        folder = find_library_dir()
        if folder is None:
            searched = ", ".join(str(d) for d in candidate_dirs()[:3])
            return NativeStatus(
                False,
                None,
                f"the patched libllama is not built (searched {searched}, ...); build it with scripts/build_native.sh or reinstall loramux",
            )
        current = os.environ.get(LLAMA_ENV)
        if current and Path(current).resolve() != folder:
            # the user chose a library: use it if it is a patched one, never load a second copy
            folder = Path(current)
        os.environ[LLAMA_ENV] = str(folder)
    try:
        import llama_cpp.llama_cpp as lc  # noqa: F401  (loads the library)
    except (ImportError, OSError, RuntimeError) as exc:
        return NativeStatus(False, None, f"llama_cpp could not load its library: {exc}")
    status = _check_handle(lc._lib, "libllama")
    if not status.available and loaded is not None:
        return NativeStatus(
            False,
            status.library,
            status.reason + " (llama_cpp was imported before loramux.native could point it at the patched library; import loramux first)",
        )
    return status
