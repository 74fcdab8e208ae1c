"""loramux inspect: what an adapter (PEFT folder or GGUF file) holds."""

from __future__ import annotations

import argparse
import json

from loramux.converters.inspect import describe_adapter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print what an adapter holds (PEFT folder or GGUF file)",
        description="Print an adapter's type, rank(s), alpha(s), targets, dtypes and size. "
        "Reads PEFT folders and GGUF LoRA files; a PEFT folder is fully validated on the way.",
    )
    p.add_argument("path", help="PEFT LoRA folder or GGUF adapter file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = describe_adapter(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
