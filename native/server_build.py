"""Build loramux's llama-server: upstream's server, patched, linked against the installed libllama.

``loramux llama-server build`` runs :func:`build_llama_server`. The server is upstream's
tools/server from the pinned llama.cpp with ``patches/0002-*`` (per-sequence mixes per slot, the
prompt cache keyed by mix, ``--lora-max-active``, ``lora_routing``), compiled by
``server/CMakeLists.txt`` against the *installed* patched ``libllama`` / ``libggml*`` (the library
this package loads, :func:`loramux.native._loader.find_library_dir`): llama.cpp itself is not
compiled again, only llama-common, mtmd, cpp-httplib and the server (about 5 minutes of 2 cores
the first time). The binary's rpath is that library folder, so it loads exactly those files.

Cached under ``$LORAMUX_HOME/llama-server/loramux-<sources key>/``: one CMake build folder per
patched source tree (shared by every install of the same sources, so a second install only
relinks), and one binary per library folder (``bin-<hash>/llama-server``). A build is skipped when
the binary's stamp (sources key, build file, library files) still matches.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from loramux.base_model import cache_dir
from loramux.errors import LoramuxError
from loramux.native import fetch_llama

HERE = Path(__file__).resolve().parent
SERVER_PROJECT = HERE / "server"
STAMP = ".loramux-build"


class ServerBuildError(LoramuxError):
    """The patched llama-server could not be built; the message says what to do."""


def patch_id(sources_key: str) -> str:
    """What ``llama-server --version`` shows as its commit: the pin and the loramux sources."""
    return f"{fetch_llama.VENDORED_COMMIT}+loramux-{sources_key[:12]}"


def _library_dir() -> Path:
    from loramux.native import _loader

    lib_dir = _loader.find_library_dir()
    if lib_dir is None:
        raise ServerBuildError(
            "no patched libllama found (searched: "
            + ", ".join(str(d) for d in _loader.candidate_dirs())
            + "): install loramux with its native library first (bash scripts/setup.sh, or pip install . from a checkout)"
        )
    return lib_dir


def _stamp(sources_key: str, lib_dir: Path) -> str:
    h = hashlib.sha256(sources_key.encode())
    h.update((SERVER_PROJECT / "CMakeLists.txt").read_bytes())
    for lib in sorted(lib_dir.iterdir()):
        if lib.is_file():
            st = lib.stat()
            h.update(f"{lib.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _stable_project(root: Path) -> Path:
    """A copy of server/CMakeLists.txt under ``root`` (rewritten only when it changed), so every
    install of the same sources configures the one shared build folder from the same path."""
    project = root / "project"
    project.mkdir(parents=True, exist_ok=True)
    target = project / "CMakeLists.txt"
    data = (SERVER_PROJECT / "CMakeLists.txt").read_bytes()
    if not target.is_file() or target.read_bytes() != data:
        target.write_bytes(data)
    return project


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers may all ask for the binary
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: list[str], log: TextIO, what: str, sources: Path) -> None:
    # llama.cpp's build info asks git for a commit: no repository above the sources may answer
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(sources.parent))
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise ServerBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}; its output is above")


def build_llama_server(*, force: bool = False, jobs: int | None = None, log: TextIO = sys.stderr) -> Path:
    """Build (once) the patched llama-server and return the binary's path.

    ``force`` rebuilds even when the cached binary's stamp matches (incremental: unchanged
    objects are kept). CMake's and the compiler's output goes to ``log``.
    """
    lib_dir = _library_dir()
    home = cache_dir()
    try:
        sources = fetch_llama.prepare(home / "native")
    except (fetch_llama.FetchError, OSError) as exc:
        raise ServerBuildError(f"cannot prepare the patched llama.cpp sources: {exc}") from None
    key = fetch_llama.sources_key(fetch_llama.LLAMA_CPP_PYTHON_VERSION)
    root = home / "llama-server" / f"loramux-{key[:16]}"
    out_dir = root / f"bin-{hashlib.sha256(str(lib_dir).encode()).hexdigest()[:12]}"
    binary = out_dir / "llama-server"
    stamp = _stamp(key, lib_dir)
    with _locked(root):
        if not force and binary.is_file() and (out_dir / STAMP).is_file() and (out_dir / STAMP).read_text().strip() == stamp:
            return binary
        if shutil.which("cmake") is None:
            raise ServerBuildError("building llama-server needs cmake on PATH (pip install cmake)")
        build = root / "build"
        project = _stable_project(root)  # CMake's cache pins the source folder: not one install's site-packages
        configure = ["cmake", "-S", str(project), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja") and not (build / "CMakeCache.txt").is_file():
            configure += ["-G", "Ninja"]
        configure += [f"-DLORAMUX_LLAMA_DIR={sources}", f"-DLORAMUX_LIB_DIR={lib_dir}", f"-DLORAMUX_PATCH_ID={patch_id(key)}"]
        print(f"loramux: building llama-server against {lib_dir} (first build: about 5 minutes on 2 cores)", file=log, flush=True)
        _run(configure, log, "configuring llama-server", sources)
        jobs = jobs or os.cpu_count() or 2
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], log, "building llama-server", sources)
        built = build / "bin" / "llama-server"
        if not built.is_file():
            raise ServerBuildError(f"the build finished but {built} is missing")
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".llama-server.{os.getpid()}"
        shutil.copy2(built, tmp)
        os.replace(tmp, binary)  # never a half-written binary
        (out_dir / STAMP).write_text(stamp + "\n")
    return binary


__all__ = ["ServerBuildError", "build_llama_server", "patch_id"]
