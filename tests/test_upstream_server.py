"""llama.cpp's own server tests (tools/server/tests of the pinned llama.cpp), run against ``loramux serve``.

Upstream's unit files are copied at test time into a temporary llama.cpp-shaped folder (never
committed here) and run by a pytest in a subprocess, with ``LLAMA_SERVER_BIN_PATH`` set to
tests/upstream_server/launcher.py (llama-server's flags translated to ``loramux serve``'s, the
model replaced by the embedded base) and the plugin tests/upstream_server/loramux_upstream.py
(no hub downloads, the skip list tests/upstream_server/skips.toml applied with its reasons).
Every test not in the skip list must pass; the failures are printed with their assertion.

The pinned sources are found as loramux's llama-server build finds them
(:func:`loramux.native.fetch_llama.prepare` under ``$LORAMUX_HOME/native``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "upstream_server"
LAUNCHER = RUNNER / "launcher.py"
UNIT_FILES = [
    "test_basic.py",
    "test_chat_completion.py",
    "test_completion.py",
    "test_lora.py",
    "test_security.py",
    "test_stream.py",
    "test_tokenize.py",
]
TIMEOUT_S = 1500  # one unit file; the slowest (test_completion.py) takes a few minutes
UPSTREAM_SKIP = "upstream"  # a skip of upstream's own (skip/skipif markers, pytest.skip in the test)


def pinned_llama_cpp() -> Path:
    """The patched llama.cpp sources loramux builds from (``$LORAMUX_HOME/native/llama.cpp``), prepared once."""
    from loramux.base_model import cache_dir
    from loramux.native import fetch_llama

    return fetch_llama.prepare(cache_dir() / "native")


@pytest.fixture(scope="module")
def upstream_tests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tools/server/tests (utils.py, conftest.py, pytest.ini, the unit files), llama.cpp-shaped.

    ``models/`` is linked from the pinned tree: upstream's tests name chat template files as
    ``../../../models/templates/...`` from their own folder.
    """
    src = pinned_llama_cpp()
    tree = tmp_path_factory.mktemp("upstream") / "llama.cpp"
    dest = tree / "tools" / "server" / "tests"
    (dest / "unit").mkdir(parents=True)
    (dest / "tmp").mkdir()
    for name in ("utils.py", "conftest.py", "pytest.ini"):
        shutil.copyfile(src / "tools" / "server" / "tests" / name, dest / name)
    for name in UNIT_FILES:
        shutil.copyfile(src / "tools" / "server" / "tests" / "unit" / name, dest / "unit" / name)
    (tree / "models").symlink_to(src / "models", target_is_directory=True)
    return dest


def free_port() -> int:
    """A TCP port free on loopback now (upstream's default, 8080, may be another server's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_upstream(folder: Path, unit_file: str, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run one upstream unit file under the plugin; junit XML and the plugin's report go to ``out``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LLAMA_ARG_"))}
    env.update(
        LLAMA_SERVER_BIN_PATH=str(LAUNCHER),
        PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(RUNNER), env.get("PYTHONPATH")])),
        LORAMUX_UPSTREAM_REPORT=str(out / "report.json"),
        LLAMA_CACHE=str(folder / "tmp"),
    )
    env.setdefault("LORAMUX_UPSTREAM_THREADS", "1")  # see launcher.py: no spinning barriers on a shared machine
    env.pop("DEBUG", None)  # upstream's DEBUG=1 passes --verbose
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "loramux_upstream", "-c", "pytest.ini"]
    cmd += ["--rootdir", str(folder), "-q", "-rfEs", "--tb=short", f"--junitxml={out / 'junit.xml'}", f"unit/{unit_file}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc, time.monotonic() - start


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, message) from pytest's junit XML; outcome passed/failed/error/skipped/upstream."""
    result: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = ("failed" if child.tag == "failure" else "error"), (child.get("message") or "")
            elif child.tag == "skipped":
                message = child.get("message") or ""
                outcome = "skipped" if "loramux skip list: " in message else UPSTREAM_SKIP
        result[name] = (outcome, message.splitlines()[0] if message else "")
    return result


@pytest.mark.parametrize("unit_file", UNIT_FILES)
def test_upstream_server(unit_file: str, upstream_tests: Path, tmp_path: Path) -> None:
    """Every upstream test of ``unit_file`` passes against loramux serve, but those the skip list names."""
    proc, seconds = run_upstream(upstream_tests, unit_file, tmp_path)
    junit = tmp_path / "junit.xml"
    assert junit.is_file(), f"upstream pytest wrote no junit XML (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    results = outcomes(junit)
    counts = {k: sum(1 for o, _ in results.values() if o == k) for k in ("passed", "failed", "error", "skipped", UPSTREAM_SKIP)}
    print(f"{unit_file}: {len(results)} tests in {seconds:.0f} s: {counts}")
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["stale_skips"], f"skips.toml lists tests {unit_file} does not have: {report['stale_skips']}"
    bad = {name: msg for name, (outcome, msg) in results.items() if outcome in ("failed", "error")}
    summary = "\n".join(f"  {name}: {msg[:300]}" for name, msg in sorted(bad.items()))
    assert not bad, f"{len(bad)} of {len(results)} upstream tests failed against loramux serve:\n{summary}\n\n{proc.stdout[-20000:]}"
    assert proc.returncode in (0, 5), f"upstream pytest exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
