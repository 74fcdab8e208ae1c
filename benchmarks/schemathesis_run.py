"""Property-based fuzzing of ``loramux serve`` with schemathesis, for a bounded time.

Starts a real ``loramux serve`` on loopback (two PEFT fixture adapters, a small context so
that every generated request answers quickly) and runs schemathesis' CLI against its
``/openapi.json``: every operation, positive and negative bodies, the coverage, fuzzing and
stateful phases, with the check ``not_a_server_error`` (no 5xx, whatever the body). Exit
status 0 when it found nothing.

    .venv/bin/python benchmarks/schemathesis_run.py --max-time 300 --max-examples 200
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
ADAPTERS = ("boolean_expressions", "navigate")


def schemathesis_exe() -> str:
    """The schemathesis CLI beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "schemathesis"
    found = str(beside) if beside.exists() else shutil.which("schemathesis")
    if found is None:
        raise RuntimeError("schemathesis is not installed: pip install 'schemathesis>=3.30' (the dev extra)")
    return found


def run_schemathesis(
    url: str, *, max_examples: int, max_time: int, seed: int, workdir: Path, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """``schemathesis run URL/openapi.json`` checking ``not_a_server_error``; its output is in the result."""
    cmd = [
        schemathesis_exe(),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--max-time",
        str(max_time),
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--no-color",
    ]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout or max_time + 120)


def prepare_adapters(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTERS:
        shutil.copytree(FIXTURES / name, dest / name, dirs_exist_ok=True)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-time", type=int, default=300, help="schemathesis' time budget in seconds (default: 300)")
    ap.add_argument("--max-examples", type=int, default=200, help="test cases per operation and phase (default: 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=128, help="the server's --n-ctx (default: 128)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from serve_proc import loramux_server_process

    with tempfile.TemporaryDirectory(prefix="loramux-schemathesis-") as tmp:
        adapters = prepare_adapters(Path(tmp) / "adapters")
        flags = ["--adapters", str(adapters), "--n-ctx", str(args.n_ctx), "--n-seq-max", "2", "--threads", "1"]
        with loramux_server_process(*flags, log_dir=Path(tmp)) as server:
            t0 = time.perf_counter()
            done = run_schemathesis(server.url, max_examples=args.max_examples, max_time=args.max_time, seed=args.seed, workdir=Path(tmp))
            wall = time.perf_counter() - t0
            log = server.log.read_text()
    print(done.stdout[-6000:], done.stderr[-2000:], sep="\n")
    if "Traceback" in log:
        print("server log has a traceback:\n" + log[-4000:])
    print(f"schemathesis: exit {done.returncode} after {wall:.0f} s")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
