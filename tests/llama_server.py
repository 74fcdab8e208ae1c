"""A stock llama-server for tests and benchmarks (a helper module, not a test file).

The binary is upstream's llama-server, unpatched, built by ``scripts/build_llama_server.sh`` from
the same pinned llama.cpp as loramux's native library (vendor/llama.cpp of the llama-cpp-python
sdist) and cached in ``$LORAMUX_HOME/llama-server/<version>/bin/llama-server``.
``running_llama_server(..., binary=PATH)`` starts another build with the same flags instead, e.g.
loramux's patched server (the last line of ``loramux llama-server build``).

    from llama_server import running_llama_server, http_json

    with running_llama_server(base_gguf, [a.gguf, b.gguf], n_parallel=2) as url:
        http_json("GET", url + "/lora-adapters")        # [{"id": 0, "path": ..., "scale": 1.0, ...}, ...]
        http_json("POST", url + "/completion", {"prompt": "...", "n_predict": 8,
                                                "lora": [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]})

Semantics of this llama-server version (tools/server in the pinned llama.cpp) worth knowing:

- ``--lora FILE`` loads an adapter at scale 1.0; ``--lora-init-without-apply`` only skips applying
  the adapters while the context is created (warm-up): the server's global list keeps scale 1.0
  (``GET /lora-adapters`` shows it) until ``POST /lora-adapters`` changes it.
- A request's ``lora`` (``[{"id": i, "scale": s}, ...]``) sets the scale of every listed adapter
  and 0.0 for every adapter not listed; ids out of range are ignored silently. A request without
  ``lora`` -- or with an empty list -- uses the global list (all at 1.0 unless changed), so the
  base model alone is ``"lora": [{"id": 0, "scale": 0.0}]``, not ``[]``.
- ``--lora`` splits its value at commas, so adapter paths must not hold one.
- Slots whose adapter scales differ are never decoded in one batch; a change of a request's
  ``lora`` on a slot drops its prompt cache -- but a request *without* ``lora`` after one with it
  reuses the slot's cache computed under the old mix (prompt tokens are not re-evaluated: wrong
  logits). Send ``lora`` on every request (explicit zeros for the base), or ``cache_prompt: false``.
- ``cache_prompt`` (default true) and ``id_slot`` (default -1: any slot) are request fields of
  /completion and, passed through, of /v1/chat/completions (which accepts ``lora`` too).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from loramux.server.llama_process import llama_server_process

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
HEALTH_TIMEOUT_S = 120.0

_binary: Path | None = None


class LlamaServerError(RuntimeError):
    pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


def llama_server_binary() -> Path:
    """The stock llama-server binary, built (once, several minutes) if it is not there yet."""
    global _binary
    if _binary is not None and _binary.is_file():
        return _binary
    with tempfile.NamedTemporaryFile(prefix="llama-server-build-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=log, text=True)
    lines = proc.stdout.strip().splitlines()
    binary = Path(lines[-1]) if lines else None
    if proc.returncode != 0 or binary is None or not binary.is_file() or not os.access(binary, os.X_OK):
        raise LlamaServerError(
            f"{BUILD_SCRIPT.relative_to(ROOT)} failed (exit {proc.returncode}; full log: {log_path}):\n"
            f"{_tail(log_path)}\n{proc.stdout[-1000:]}"
        )
    log_path.unlink(missing_ok=True)
    _binary = binary
    return binary


def http_json(method: str, url: str, body: Any = None, *, timeout: float = 600.0) -> Any:
    """One JSON request with urllib; raises LlamaServerError with the server's answer on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise LlamaServerError(f"{method} {url}: HTTP {exc.code}: {exc.read().decode('utf-8', 'replace')[:2000]}") from None


@contextmanager
def running_llama_server(
    model: Path,
    loras: Sequence[Path],
    *,
    n_parallel: int = 1,
    n_ctx: int = 2048,
    threads: int = 2,
    extra_args: Sequence[str] = (),
    binary: Path | None = None,
) -> Iterator[str]:
    """Run llama-server on 127.0.0.1 (a free port) with ``--lora`` per adapter, loaded without
    applying them; yield its base URL once GET /health answers 200; stop it at exit.

    ``binary`` is the llama-server executable to run: by default the stock one
    (``llama_server_binary()``, built on first use); pass e.g. loramux's patched server (the last
    line of ``loramux llama-server build``), which takes the same flags. ``extra_args`` are appended
    to the command line as they are (``--metrics``, ``--lora-max-active 4``, ...).

    Note that ``-c n_ctx`` is the whole KV cache: with ``-np n_parallel`` each slot gets
    n_ctx / n_parallel (the KV buffer is unified only when the number of slots is left on auto).
    """
    for f in (model, *loras):
        if not Path(f).is_file():
            raise FileNotFoundError(f)
        if "," in str(f):
            raise ValueError(f"llama-server's --lora splits at commas: {f}")
    if binary is None:
        binary = llama_server_binary()
    elif not Path(binary).is_file() or not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"not an executable llama-server: {binary}")
    flags = ["-np", n_parallel, "-c", n_ctx, "-t", threads, "--lora-init-without-apply"]
    for f in loras:
        flags += ["--lora", f]
    with llama_server_process(binary, Path(model), [*flags, *extra_args], timeout=HEALTH_TIMEOUT_S) as server:
        yield server.url
