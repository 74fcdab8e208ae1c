"""loramux llama-server: build llama-server with loramux's per-sequence mixes (and print its path)."""

from __future__ import annotations

import argparse

EPILOG = """\
The binary is upstream's llama-server from the pinned llama.cpp, patched so that requests with
different "lora" scales decode in one batch (each slot's sequence carries its own mix), the prompt
cache is keyed by (mix, tokens), and a request may route per token with
"lora_routing": {"mode": "arrow" | "spectr", "k": K, "temperature": T}. It links the patched
libllama this package loads: llama.cpp is not compiled again, only the server (about 5 minutes
on 2 cores the first time; later calls print the cached path at once).

Its own flags are llama-server's, plus --lora-max-active N (default 4): a mix of up to N adapters
runs per sequence; a wider one runs as stock llama-server runs it (logged, counted in /metrics).
GET /props says "loramux": {...} on this build.

Examples:
  BIN=$(loramux llama-server build | tail -n 1)
  $BIN -m model.gguf --lora a.gguf --lora b.gguf -np 8 --lora-init-without-apply --metrics
  loramux serve --upstream http://127.0.0.1:8080 --router router.onnx   # the router in front
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "llama-server",
        help="build llama-server with per-sequence LoRA mixes (different mixes share decodes)",
        description="Build llama.cpp's llama-server patched for per-request LoRA mixes decoded together.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser(
        "build",
        help="build once (cached) and print the binary's path as the last line",
        description="Build the patched llama-server against the installed libllama, once; print its path (last line of stdout).",
    )
    b.add_argument("--force", action="store_true", help="rebuild even if the cached binary is up to date (incremental)")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: the cores)")
    b.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    from loramux.native.server_build import build_llama_server

    print(build_llama_server(force=args.force, jobs=args.jobs))
    return 0
