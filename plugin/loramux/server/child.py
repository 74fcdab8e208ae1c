"""``loramux serve --llama-server``: loramux's patched llama-server as a child, the hook in front.

:func:`patched_llama_server` builds the patched server once (:mod:`loramux.native.server_build`),
resolves ``--adapters`` into GGUF files as ``loramux serve`` does (PEFT folders are converted into
loramux's cache), and starts the server on a free loopback port with one ``--lora`` per adapter,
named by a symlink ``<adapter name>.gguf`` so that the hook names upstream adapters as the pool
does. It yields the server's URL once ``/health`` answers, and stops the server (SIGTERM, then
SIGKILL after a grace period) when the block ends; on Linux the child also dies with its parent.
The child's log is kept in the temporary folder and its tail is quoted if it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

from loramux.errors import LoramuxError
from loramux.server.settings import ServeSettings

START_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0


class ChildServerError(LoramuxError):
    """The patched llama-server did not start (the message quotes its log)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def adapter_files(settings: ServeSettings, base: Path) -> dict[str, Path]:
    """``{name: GGUF file}`` for ``--adapters`` (PEFT folders converted once, into loramux's cache)."""
    from loramux.adapters import adapter_name, cached_conversion, converted_adapter_path, find_adapter_sources, is_peft_folder
    from loramux.converters import read_base_model

    info = read_base_model(base)
    out: dict[str, Path] = {}
    for root in settings.adapters:
        for source in find_adapter_sources(root)[0]:
            name = adapter_name(source)
            if name in out:
                raise LoramuxError(f"two adapters are named {name!r} ({out[name]} and {source}): rename one")
            if is_peft_folder(source):
                target = converted_adapter_path(source, info, skip_embeddings=settings.skip_embeddings)
                source = cached_conversion(
                    source, base, target, outtype="f16", skip_embeddings=settings.skip_embeddings, allow_pickle=False
                )
            out[name] = source.resolve()
    return out


def server_command(binary: Path, base: Path, links: list[Path], settings: ServeSettings, port: int) -> list[str]:
    threads = settings.threads or min(os.cpu_count() or 1, 8)
    cmd = [str(binary), "-m", str(base), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", str(settings.n_seq_max), "-c", str(settings.n_ctx * settings.n_seq_max), "-t", str(threads)]
    cmd += ["--lora-max-active", str(settings.max_active), "--lora-init-without-apply", "--metrics"]
    cmd += ["-fa", "on" if settings.flash_attn else "off"]
    for link in links:
        cmd += ["--lora", str(link)]
    return cmd


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise ChildServerError(f"llama-server exited with {proc.returncode} while starting (log {log}):\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ChildServerError(f"llama-server not ready after {START_TIMEOUT_S:.0f} s (log {log}):\n{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return log.read_bytes()[-n:].decode("utf-8", "replace")
    return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def patched_llama_server(settings: ServeSettings) -> Iterator[str]:
    """Start loramux's patched llama-server for ``settings`` (base, adapters, slots, context,
    threads, max_active, flash attention); yield its URL; stop it at the end."""
    from loramux.base_model import default_base_model
    from loramux.native.server_build import build_llama_server

    binary = build_llama_server()
    base = Path(settings.base) if settings.base else default_base_model()
    files = adapter_files(settings, base)
    with tempfile.TemporaryDirectory(prefix="loramux-llama-server-") as tmp:
        links = []
        for name, path in files.items():
            link = Path(tmp) / f"{name}.gguf"
            link.symlink_to(path)
            links.append(link)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "llama-server.log"
        cmd = server_command(binary, base, links, settings, port)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}  # flags only
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        try:
            _wait_ready(proc, url, log)
            print(f"loramux serve: patched llama-server (pid {proc.pid}) on {url} with {len(files)} adapters", file=sys.stderr)
            yield url
        finally:
            _stop(proc)


__all__ = ["ChildServerError", "adapter_files", "patched_llama_server", "server_command"]
