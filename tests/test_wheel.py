"""The wheel: every package is there (all tracked Python modules), and nothing that must stay out
(tests, virtual environments, build trees, compiled caches, the ../shared fixtures and data)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> where its files land in the wheel (pyproject's [tool.scikit-build.wheel.packages]).
PACKAGE_ROOTS = {"plugin/loramux": "loramux", "converters": "loramux/converters", "native": "loramux/native"}
FORBIDDEN_PARTS = {"tests", ".venv", "venv", "build", "_skbuild", "CMakeFiles", "__pycache__", ".pytest_cache", "shared", ".git"}
SHIPPED_SUFFIXES = (".py", ".html", ".js", ".css")  # modules, and the static files of loramux serve's page
FORBIDDEN_SUFFIXES = (".pyc", ".o", ".obj", ".a", ".safetensors", ".gguf", ".jsonl", ".bin", ".onnx", ".onnx_adapter")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The venv's scikit-build-core when it has one (fast, offline); else build's isolated env.
    isolation = ["--no-isolation"] if importlib.util.find_spec("scikit_build_core") else []
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", *isolation, "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"building the wheel failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    wheels = list(out.glob("loramux-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _tracked_modules() -> dict[str, str]:
    """Tracked modules and shipped assets (the playground's page) of the three package folders -> their path inside the wheel."""
    listed = subprocess.run(["git", "ls-files", *PACKAGE_ROOTS], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    out = {}
    for path in listed:
        if not path.endswith(SHIPPED_SUFFIXES):
            continue
        for source, target in PACKAGE_ROOTS.items():
            if path.startswith(source + "/"):
                out[path] = target + path[len(source) :]
    return out


def test_every_package_and_module_is_in_the_wheel(wheel):
    names = set(_names(wheel))
    for package in ("loramux", "loramux/cli", "loramux/converters", "loramux/native"):
        assert f"{package}/__init__.py" in names, f"{package} missing from {wheel.name}"
    tracked = _tracked_modules()
    assert len(tracked) > 20
    missing = sorted(src for src, dst in tracked.items() if dst not in names)
    assert not missing, f"tracked modules missing from the wheel: {missing}"


def test_nothing_that_must_stay_out_is_in_the_wheel(wheel):
    bad = []
    for name in _names(wheel):
        parts = name.split("/")
        if parts[0].endswith(".dist-info"):
            continue
        if parts[0] != "loramux" or FORBIDDEN_PARTS.intersection(parts) or name.endswith(FORBIDDEN_SUFFIXES):
            bad.append(name)
        if any(p.startswith("test_") or p == "conftest.py" for p in parts):
            bad.append(name)
    assert not bad, f"{wheel.name} holds files that must stay out: {sorted(set(bad))[:20]}"


def test_wheel_metadata_declares_the_command_and_the_extras(wheel):
    with zipfile.ZipFile(wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(info).decode()
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "loramux = loramux.cli:main" in entry_points
    assert "Requires-Dist: llama-cpp-python==0.3.36" in metadata
    for extra in ("train", "onnx", "serve", "ray", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
