"""Run one llama-server process on loopback: start, wait until it answers, stop.

The one place that starts a llama-server binary (loramux's patched one for ``loramux serve
--llama-server``, :mod:`loramux.server.child`; the stock one for the tests and benchmarks,
tests/llama_server.py): a free port (retried if another process takes it first), the caller's
``LLAMA_ARG_*`` / ``LLAMA_API_KEY`` kept out of the child's environment (llama.cpp reads them),
``/health`` polled until 200 and ``/props`` checked to be this process's model, the log in a
temporary file whose tail is quoted when the server fails; at the end SIGTERM, then SIGKILL
after a grace period. On Linux the child also gets SIGTERM if this process dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import httpx

from loramux.errors import LoramuxError

START_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0
PORT_ATTEMPTS = 3


class LlamaServerError(LoramuxError):
    """A llama-server did not start (the message quotes its command line and its log)."""


@dataclasses.dataclass
class LlamaServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _tail(log: Path, n: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return log.read_bytes()[-n:].decode("utf-8", "replace")
    return ""


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(proc: subprocess.Popen, url: str, model: Path, log: Path, cmd: list[str], timeout: float, may_retry: bool) -> bool:
    """True once /health is 200 and /props names our model; False if the port was lost (may_retry)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = _tail(log)
            if may_retry and ("couldn't bind" in tail or "address already in use" in tail.lower()):
                return False
            raise LlamaServerError(f"llama-server exited with {proc.returncode} while starting:\n{' '.join(cmd)}\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise LlamaServerError(f"llama-server not ready after {timeout:.0f} s:\n{' '.join(cmd)}\n{_tail(log)}")
        time.sleep(0.2)
    # a server that lost the port exits at once, but another server on that port would answer /health
    with contextlib.suppress(httpx.HTTPError, ValueError):
        if httpx.get(f"{url}/props", timeout=10).json().get("model_path") == str(model) and proc.poll() is None:
            return True
    if may_retry:
        return False
    raise LlamaServerError(f"another server answers on {url}:\n{' '.join(cmd)}")


@contextlib.contextmanager
def llama_server_process(
    binary: Path, model: Path, flags: Sequence[str], *, timeout: float = START_TIMEOUT_S
) -> Iterator[LlamaServerProcess]:
    """``binary -m model --host 127.0.0.1 --port FREE FLAGS``; yields it once ready; stops it at exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_") and k != "LLAMA_API_KEY"}
    for attempt in range(PORT_ATTEMPTS):  # the free port can be taken between our probe and the bind
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *map(str, flags)]
        with tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False) as out:
            log = Path(out.name)
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        try:
            ready = _ready(proc, url, model, log, cmd, timeout, attempt < PORT_ATTEMPTS - 1)
        except BaseException:
            stop(proc)
            raise
        if not ready:
            stop(proc)
            log.unlink(missing_ok=True)
            continue
        try:
            yield LlamaServerProcess(url, proc, log)
        finally:
            stop(proc)
            log.unlink(missing_ok=True)
        return
    raise LlamaServerError(f"llama-server could not bind a free port {PORT_ATTEMPTS} times")


__all__ = ["LlamaServerError", "LlamaServerProcess", "free_port", "llama_server_process", "stop"]
