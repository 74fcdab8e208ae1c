"""The ``loramux`` command: a thin argparse layer over the library.

Each subcommand lives in its own module with ``register(subparsers)``; a module's
``run(args) -> int`` does the work. Library errors (LoramuxError) become one
clear line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loramux import __version__
from loramux.errors import LoramuxError

# Subcommand modules, in the order `loramux --help` lists them.
SUBCOMMANDS: list[str] = [
    "loramux.cli.convert_cmd",
    "loramux.cli.inspect_cmd",
    "loramux.cli.fetch_cmd",
    "loramux.cli.demo_cmd",
    "loramux.cli.onnx_cmd",
    "loramux.cli.run_cmd",
    "loramux.cli.chat_cmd",
    "loramux.cli.eval_cmd",
    "loramux.cli.serve_cmd",
    "loramux.cli.llama_server_cmd",
    "loramux.cli.router_cmd",
    "loramux.cli.route_cmd",
    "loramux.cli.compose_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramux",
        description="Per-request weighted mixes of LoRA adapters for llama.cpp.",
    )
    parser.add_argument("--version", action="version", version=f"loramux {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an optional part missing must not break the others
            if exc.name and exc.name.startswith("loramux.cli."):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 1
    try:
        return int(args.run(args) or 0)
    except LoramuxError as exc:
        print(f"loramux {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
