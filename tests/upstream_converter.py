"""llama.cpp's own ``convert_lora_to_gguf.py``, obtained from the pinned llama-cpp-python sdist.

Shared by the tests (tensor-for-tensor oracle, the rsLoRA mis-scale record) and
``benchmarks/convert.py`` (speed and memory, side by side). Nothing here is
loramux code: it fetches the pinned sdist with pip, caches the three parts of
``vendor/llama.cpp`` the script needs (the script, its ``conversion`` package and
the vendored ``gguf-py``) under ``loramux.base_model.cache_dir() / "sdist"``, and
runs the script the way its README says, with ``--base`` pointing at a folder that
holds only a ``config.json`` rebuilt from the base GGUF (no hub access here).

The script needs torch and transformers (the ``train`` extra).

Run as a script, ``python tests/upstream_converter.py batch JOBS.json`` converts
several adapters in one process (torch is imported once): the tests use it to
keep their run time small. The benchmark runs one process per adapter, as a user does.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
_VENDOR = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
# What the script imports: itself, the conversion/ model classes, the vendored gguf-py.
_MEMBERS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_SCRIPTS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py")  # a cached tree missing one is extracted again


def _cache_root() -> Path:
    from loramux.base_model import cache_dir

    return cache_dir() / "sdist"


def upstream_dir() -> Path:
    """The cached ``vendor/llama.cpp`` subset of the pinned sdist, fetched with pip on first use."""
    target = _cache_root() / f"llama-cpp-{SDIST_VERSION}"
    if all((target / s).is_file() for s in _SCRIPTS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="upstream-sdist-", dir=target.parent) as tmp:
        sdist = _download_sdist(Path(tmp))
        staging = Path(tmp) / "tree"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if not member.name.startswith(_VENDOR) or not (member.isfile() or member.isdir()):
                    continue
                rel = member.name[len(_VENDOR) :]
                if not rel or not any(rel == m or rel.startswith(m) for m in _MEMBERS):
                    continue
                dest = staging / rel
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, dest.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not (staging / "convert_lora_to_gguf.py").is_file():
            raise RuntimeError(f"{sdist} has no {_VENDOR}convert_lora_to_gguf.py")
        if target.exists():  # an older, partial cache (without convert_hf_to_gguf.py)
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "convert_lora_to_gguf.py").is_file():  # another process won the race otherwise
                raise
    return target


def _download_sdist(into: Path) -> Path:
    """The sdist .tar.gz via pip; cached beside the extracted tree so that it is fetched once."""
    cached = _cache_root() / SDIST_FILE
    if cached.is_file():
        return cached
    # pip prepares the sdist's metadata. With the venv's scikit-build-core (--no-build-isolation)
    # that takes seconds; otherwise pip sets up an isolated build env from wheels (only this
    # package is --no-binary: ':all:' would build cmake from source for minutes).
    import importlib.util

    isolation = ["--no-build-isolation"] if importlib.util.find_spec("scikit_build_core") else []
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-binary",
        SDIST_NAME,
        *isolation,
        "-d",
        str(into),
        f"{SDIST_NAME}=={SDIST_VERSION}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = into / SDIST_FILE
    if done.returncode != 0 or not found.is_file():
        raise RuntimeError(f"pip could not fetch the {SDIST_NAME} {SDIST_VERSION} sdist: {done.stderr.strip()[-800:]}")
    os.replace(found, cached)
    return cached


def base_config_dir(base_gguf: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """A folder holding the ``config.json`` the upstream script wants as ``--base``, rebuilt from the GGUF."""
    from loramux.converters.gguf_to_torch import hf_llama_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_llama_config(base_gguf), indent=1))
    return folder


def script_path() -> Path:
    return upstream_dir() / "convert_lora_to_gguf.py"


def upstream_env(single_thread: bool = True) -> dict[str, str]:
    """Environment for the script: its vendored gguf-py first, no hub access attempted.

    ``single_thread`` (the tests' choice on a busy machine) pins torch to one thread; the
    benchmark leaves the user's default.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(upstream_dir() / "gguf-py"), str(upstream_dir())])
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    if single_thread:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def upstream_args(peft_dir: str | os.PathLike, config_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32") -> list[str]:
    """Arguments of one conversion (after the script path)."""
    return ["--base", str(config_dir), "--outtype", outtype, "--outfile", str(out), str(peft_dir)]


def upstream_command(peft_dir, config_dir, out, outtype: str = "f32") -> list[str]:
    """The command a user runs: one process per adapter."""
    return [sys.executable, str(script_path()), *upstream_args(peft_dir, config_dir, out, outtype)]


def convert_many(
    jobs: list[tuple[Path, Path]], base_gguf: str | os.PathLike, outtype: str = "f32", hf_dir: str | os.PathLike | None = None
) -> None:
    """Convert ``[(peft_dir, out), ...]`` with the upstream script in one subprocess (tests only).

    ``hf_dir``: the base model's Hugging Face folder, when there is one (the tiny models); else a
    ``config.json`` is rebuilt from the base GGUF."""
    with tempfile.TemporaryDirectory(prefix="upstream-base-") as tmp:
        config_dir = Path(hf_dir) if hf_dir else base_config_dir(base_gguf, Path(tmp) / "base")
        spec = Path(tmp) / "jobs.json"
        spec.write_text(json.dumps([upstream_args(p, config_dir, o, outtype) for p, o in jobs]))
        done = subprocess.run([sys.executable, __file__, "batch", str(spec)], env=upstream_env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"upstream convert_lora_to_gguf.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


_CONVERTED: dict[tuple[str, str, str], Path] = {}


def converted_by_upstream(
    base_gguf: str | os.PathLike, fixtures: dict[str, Path], outtype: str = "f32", hf_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """``{name: GGUF written by the upstream script}``, converted once per process (one subprocess for all missing)."""
    import atexit

    key = lambda name: (str(base_gguf), name, outtype)  # noqa: E731
    missing = {n: p for n, p in fixtures.items() if key(n) not in _CONVERTED}
    if missing:
        folder = Path(tempfile.mkdtemp(prefix="upstream-gguf-"))
        atexit.register(shutil.rmtree, folder, True)
        jobs = [(path, folder / f"{name}.{outtype}.gguf") for name, path in missing.items()]
        convert_many(jobs, base_gguf, outtype, hf_dir)
        for name, (_, out) in zip(missing, jobs):
            _CONVERTED[key(name)] = out
    return {n: _CONVERTED[key(n)] for n in fixtures}


def _batch(spec: Path) -> int:
    script = str(script_path())
    sys.path.insert(0, str(Path(script).parent))
    for args in json.loads(spec.read_text()):
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "batch":
        sys.exit(_batch(Path(sys.argv[2])))
    if len(sys.argv) == 2 and sys.argv[1] == "path":
        print(script_path())
        sys.exit(0)
    print(f"usage: {sys.argv[0]} path | batch JOBS.json", file=sys.stderr)
    sys.exit(2)
