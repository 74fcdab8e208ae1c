#!/usr/bin/env python3
"""llama-server's command line, run as ``loramux serve``: the binary of llama.cpp's own server tests.

llama.cpp's server test suite (tools/server/tests, utils.py ``ServerProcess.start``) starts
``$LLAMA_SERVER_BIN_PATH`` with llama-server flags. With this file as that binary, each flag is
translated by the table ``FLAGS`` below into ``loramux serve`` flags, and the process becomes
``loramux serve`` (``os.execv``: the test's process handle is the server itself).

- The model flags (``--model``, ``--hf-repo``, ``--hf-file``, ...) are replaced by loramux's embedded
  default base model (SmolLM2-135M-Instruct): no ``--base``.
- A flag for a feature loramux leaves out of scope (embeddings, reranking, infill, speculative
  decoding, multimodal, slot save, router mode, the web UI and its MCP proxy, server-side tools)
  exits 2 at once with one line on stderr saying why.
- A flag with no translation at all exits 2 too: nothing that changes answers is dropped silently.
  Flags dropped on purpose say why in the table.

``LORAMUX_UPSTREAM_THREADS=N`` adds ``--threads N`` when llama-server's command line gives none
(tests/test_upstream_server.py sets 1: on a shared 2-core machine, llama.cpp's spinning thread
barriers slow a 2-thread server a hundredfold while another process computes; one thread has no
barrier, and a row of a matmul is computed by one thread either way, so answers do not change).

``LORAMUX_UPSTREAM_LENIENT=1`` drops, with a line on stderr each, the translated flags the
installed ``loramux serve`` does not know yet: to see which tests fail for their routes and fields
rather than at the server's start (a diagnostic, never what the test suite runs).

Runs with any Python 3.10+ (stdlib only); it execs the clone's ``.venv/bin/loramux`` (beside
``tests/``), or ``loramux`` on PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT_OF_SCOPE = 2  # exit status of a refused flag (a feature loramux does not have, on purpose or not yet)


@dataclass(frozen=True)
class Flag:
    """How one llama-server flag is translated.

    kind: "pass" (to ``target``, the value kept), "set" (becomes ``target``, no value), "model"
    (replaced by the base model), "drop" (answers do not change, or the note says how they do),
    "refuse" (exit 2: ``note`` says why), "special" (computed in :func:`translate`).
    """

    takes_value: bool
    kind: str
    target: str | None = None
    note: str = ""


def _p(target: str, note: str = "") -> Flag:
    return Flag(True, "pass", target, note)


def _drop(takes_value: bool, note: str) -> Flag:
    return Flag(takes_value, "drop", None, note)


def _refuse(takes_value: bool, note: str) -> Flag:
    return Flag(takes_value, "refuse", None, note)


_MODEL = "replaced by loramux's embedded base model (SmolLM2-135M-Instruct Q4_1); no hub is reached"
_ROUTER = "router mode (several models loaded on demand, --models-dir): out of scope"

# llama-server flag -> loramux serve flag, or why it is dropped / refused. Every flag utils.py
# ServerProcess.start can pass is listed.
FLAGS: dict[str, Flag] = {
    "--port": _p("--port"),
    "--host": _p("--host", "comma-separated addresses, as llama-server"),
    "--api-key": _p("--api-key"),
    "--temp": _p("--temp", "temperature of requests that give none"),
    "--seed": _p("--seed", "seed of requests that give none"),
    "--alias": _p("--alias", "the base model's id; llama-server's comma-separated aliases are passed as they are"),
    "--n-predict": _p("--n-predict", "max_tokens of requests that give none (-1: until the end)"),
    "--cors-origins": _p("--cors", "CORS origins"),
    "--threads": _p("--threads"),
    "-fa": _p("--flash-attn", "on|off (llama-server's auto: loramux's default)"),
    "--ctx-size": Flag(True, "special", "--n-ctx", "llama-server's total over all slots: loramux's --n-ctx is ctx-size / parallel"),
    "--parallel": Flag(True, "special", "--n-seq-max", "also divides --ctx-size"),
    "--kv-unified": Flag(False, "special", None, "one KV pool shared by the slots: each request may use all of ctx-size"),
    "--lora": Flag(
        True,
        "special",
        "--adapters",
        "the file is served as an adapter; NOTE llama-server applies --lora adapters at scale 1 to requests "
        "without a lora field, loramux at 0 (the base model) until POST /lora-adapters sets scales",
    ),
    "--slots": Flag(False, "set", "--slots", "GET /slots served"),
    "--no-slots": Flag(False, "set", "--no-slots", "GET /slots answers 501 not_supported_error (llama-server's default)"),
    "--verbose": Flag(False, "set", "--verbose", 'every answer carries "__verbose" (the prompt as read)'),
    "--tags": _p("--tags", "the model's tags in /models"),
    "--chat-template": _p("--chat-template", "a Jinja template's text (llama.cpp's built-in named templates are refused at start)"),
    "--chat-template-file": _p("--chat-template-file", "a Jinja chat template file"),
    "--no-ui": _drop(False, "loramux serve has no web UI to turn off"),
    # the model: always loramux's base
    "--model": Flag(True, "model", None, _MODEL),
    "--model-url": Flag(True, "model", None, _MODEL),
    "--hf-repo": Flag(True, "model", None, _MODEL),
    "--hf-file": Flag(True, "model", None, _MODEL),
    "--offline": _drop(False, "no hub is ever reached"),
    # dropped: the answers do not change (up to float rounding), or the note says what does
    "--batch-size": _drop(True, "how a prompt is split into decode calls; loramux picks its own (same tokens up to float rounding)"),
    "--ubatch-size": _drop(True, "physical batch size: same as --batch-size"),
    "--n-gpu-layers": _drop(True, "where layers run; loramux offloads what the build supports"),
    "--cont-batching": _drop(False, "loramux always batches continuously"),
    "--metrics": _drop(False, "NOTE loramux always serves GET /metrics (llama-server answers 501 without --metrics)"),
    "--no-jinja": _drop(False, "NOTE loramux always renders the GGUF's Jinja chat template (llama-server's legacy renderer here)"),
    "--jinja": _drop(False, "loramux always renders the GGUF's Jinja chat template"),
    "--no-mmproj": _drop(False, "no multimodal projector: loramux has none"),
    "--cache-ram": _drop(True, "size of llama-server's host-memory prompt cache: speed only"),
    "--no-cache-idle-slots": _drop(False, "prompt cache of idle slots: speed only"),
    "--swa-full": _drop(False, "full-size SWA cache: memory only"),
    "--backend_sampling": _drop(False, "sampling on the accelerator: same distributions (the body field is the request's business)"),
    # refused: out of scope
    "--embedding": _refuse(False, "embeddings (/embeddings, /v1/embeddings): out of scope"),
    "--pooling": _refuse(True, "embeddings pooling: out of scope"),
    "--reranking": _refuse(False, "reranking (/rerank): out of scope"),
    "--model-draft": _refuse(True, "speculative decoding (draft model): out of scope"),
    "--spec-type": _refuse(True, "speculative decoding: out of scope"),
    "--spec-draft-n-max": _refuse(True, "speculative decoding: out of scope"),
    "--spec-draft-n-min": _refuse(True, "speculative decoding: out of scope"),
    "--spec-synth-len": _refuse(True, "speculative decoding: out of scope"),
    "--spec-synth-rates": _refuse(True, "speculative decoding: out of scope"),
    "--mmproj-url": _refuse(True, "multimodal (image/audio input): out of scope"),
    "--media-path": _refuse(True, "multimodal local media files: out of scope"),
    "--slot-save-path": _refuse(True, "slot save/restore (/slots?action=save): out of scope"),
    "--models-dir": _refuse(True, _ROUTER),
    "--models-max": _refuse(True, _ROUTER),
    "--models-preset": _refuse(True, _ROUTER),
    "--no-models-autoload": _refuse(False, _ROUTER),
    "--ui-mcp-proxy": _refuse(False, "the web UI's MCP / CORS proxy (/cors-proxy): out of scope"),
    "--tools": _refuse(True, "server-side built-in tools (--tools): out of scope"),
    "--tools-runtime": _refuse(True, "server-side built-in tools: out of scope"),
    "--mcp-servers-config": _refuse(True, "MCP servers: out of scope"),
    "--mcp-servers-json": _refuse(True, "MCP servers: out of scope"),
    # refused: no equivalent (yet); a test that passes one fails at the server's start
    "--context-shift": _refuse(False, "context shift: no loramux equivalent (a prompt longer than n_ctx is a 400)"),
    "--grp-attn-n": _refuse(True, "group attention (self-extend): no loramux equivalent"),
    "--grp-attn-w": _refuse(True, "group attention (self-extend): no loramux equivalent"),
    "-ctk": _refuse(True, "KV cache type: no loramux equivalent"),
    "-ctv": _refuse(True, "KV cache type: no loramux equivalent"),
    "--reasoning-format": _refuse(True, "reasoning_content parsing: no loramux equivalent"),
    "--reasoning": _refuse(True, "reasoning on/off: no loramux equivalent"),
    "--sleep-idle-seconds": _refuse(True, "unloading the model when idle: no loramux equivalent"),
}

LLAMA_SERVER_DEFAULT_PARALLEL = 4  # llama-server's -np auto: 4 slots over one unified KV pool


class Refused(Exception):
    """A flag the launcher cannot translate: the message is the one stderr line."""


def parse(argv: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """The (flag, value) pairs of a llama-server command line, and the notes of dropped flags."""
    pairs: list[tuple[str, str | None]] = []
    notes: list[str] = []
    i = 0
    while i < len(argv):
        name = argv[i]
        flag = FLAGS.get(name)
        if flag is None:
            raise Refused(f"{name}: no translation to loramux serve (add it to the table in {Path(__file__).name})")
        value = None
        if flag.takes_value:
            if i + 1 >= len(argv):
                raise Refused(f"{name} needs a value")
            value = argv[i + 1]
        i += 2 if flag.takes_value else 1
        if flag.kind == "refuse":
            raise Refused(f"{name}: {flag.note}")
        if flag.kind in ("drop", "model"):
            notes.append(f"{name} dropped: {flag.note}")
            continue
        pairs.append((name, value))
    return pairs, notes


def translate(argv: list[str]) -> tuple[list[str], list[str]]:
    """``loramux serve`` arguments for a llama-server command line, and the notes of what was dropped."""
    pairs, notes = parse(argv)
    out: list[str] = []
    values = {name: value for name, value in pairs}
    for name, value in pairs:
        flag = FLAGS[name]
        if flag.kind == "pass":
            out += [flag.target, value]
        elif flag.kind == "set":
            out.append(flag.target)
        elif name == "--lora":
            out += ["--adapters", value]
    if "--cors-origins" not in values:  # llama-server's default: every origin may call it (reflected)
        out += ["--cors", "*"]
    threads = os.environ.get("LORAMUX_UPSTREAM_THREADS")
    if threads and "--threads" not in values:
        out += ["--threads", threads]
    parallel = int(values.get("--parallel") or LLAMA_SERVER_DEFAULT_PARALLEL)
    unified = "--kv-unified" in values or "--parallel" not in values
    if "--parallel" in values:
        out += ["--n-seq-max", str(parallel)]
    if values.get("--ctx-size") not in (None, "0"):
        total = int(values["--ctx-size"])
        out += ["--n-ctx", str(total if unified else total // parallel)]
    return out, notes


def loramux_command() -> list[str]:
    """The clone's ``loramux`` entry point (its venv beside tests/), else the one on PATH."""
    venv = ROOT / ".venv" / "bin" / "loramux"
    if venv.is_file() and os.access(venv, os.X_OK):
        return [str(venv)]
    found = shutil.which("loramux")
    if found is None:
        raise Refused(f"no loramux to run: neither {venv} nor loramux on PATH")
    return [found]


def lenient(args: list[str]) -> list[str]:
    """``args`` less the flags the installed ``loramux serve`` does not know yet (diagnostic mode).

    Imports loramux: :func:`main` runs this file again with the clone's venv Python first.
    """
    import argparse

    from loramux.cli import serve_cmd

    sub = argparse.ArgumentParser().add_subparsers()
    serve_cmd.register(sub)
    known = set(sub.choices["serve"]._option_string_actions)
    kept: list[str] = []
    i = 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        step = 2 if has_value else 1
        if args[i] in known:
            kept += args[i : i + step]
        else:
            print(f"launcher (lenient): loramux serve has no {args[i]} yet: dropped", file=sys.stderr)
        i += step
    return kept


def main(argv: list[str]) -> int:
    """Translate ``argv`` (llama-server's flags) and exec ``loramux serve``; 2 on a refused flag."""
    try:
        args, notes = translate(argv)
        command = loramux_command()
    except (Refused, ValueError) as exc:
        print(f"launcher: refused: {exc}", file=sys.stderr, flush=True)
        return OUT_OF_SCOPE
    if os.environ.get("LORAMUX_UPSTREAM_LENIENT") == "1":
        python = ROOT / ".venv" / "bin" / "python"
        if python.is_file() and Path(sys.prefix).resolve() != python.parents[1].resolve():
            os.execv(str(python), [str(python), __file__, *argv])
        args = lenient(args)
    for note in notes:
        print(f"launcher: {note}", file=sys.stderr)
    full = [*command, "serve", *args]
    print("launcher: " + " ".join(full), file=sys.stderr, flush=True)
    os.execv(full[0], full)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
