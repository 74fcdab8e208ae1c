"""Start a real ``loramux serve`` process on loopback for the tests and benchmarks (not a test module)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0, headers=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2, headers=headers).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


@dataclasses.dataclass
class ServerProcess:
    """A running ``loramux serve``: its base URL, its process and its log file."""

    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def loramux_server_process(*args: str, log_dir: Path, env: dict | None = None) -> Iterator[ServerProcess]:
    """``loramux serve ARGS --port FREE``; yields it once /health is 200; stops it at exit (if still running)."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "loramux", "serve", *args, "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield ServerProcess(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def loramux_server(*args: str, log_dir: Path, env: dict | None = None) -> Iterator[str]:
    """``loramux serve ARGS --port FREE``; yields the base URL once /health is 200; stops it at exit."""
    with loramux_server_process(*args, log_dir=log_dir, env=env) as server:
        yield server.url


__all__ = ["ServerProcess", "free_port", "loramux_server", "loramux_server_process", "wait_healthy"]
