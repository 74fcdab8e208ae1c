"""loramux route: the mix a trained router picks for a prompt, as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loramux.cli.router_cmd import add_selection_arguments, selection_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "route",
        help="print the mix a router picks for a prompt (JSON)",
        description=(
            "Tokenize PROMPT with the base model's tokenizer, run the router with onnxruntime and apply the selection "
            "settings (the router's defaults, or the options below). Prints one JSON object per prompt: "
            '{"mix": {adapter: weight}, "top1", "confidence", "fallback", "none_score", "scores", "providers"}. '
            '"fallback" says why the fallback mix was used ("none": the router chose its none-of-these outcome; '
            '"low_confidence": the top score was below --threshold), or is null.'
        ),
        epilog=(
            "Selection: p = softmax(logits / temperature) over the adapters (and 'none' if the router has it). If 'none' "
            "is the most probable outcome, or the top adapter's p is below --threshold, the fallback mix is used (base: "
            "no adapter; uniform: every adapter at fallback-weight / n). Otherwise the adapter scores are renormalised, "
            "the top-k kept, cut to the smallest set whose mass reaches top-p, renormalised, weights below min-weight "
            "dropped (never the top adapter) and renormalised again: the weights sum to 1. "
            'Example: loramux route --router router.onnx "not ( True ) and False is"'
        ),
    )
    p.add_argument("--router", type=Path, required=True, help="router .onnx file (loramux router train writes one)")
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="base model GGUF the router was trained for (default: the embedded SmolLM2-135M-Instruct Q4_1)",
    )
    p.add_argument(
        "--adapters", type=Path, default=None, help="check the router against the adapters of this folder (names must match exactly)"
    )
    p.add_argument(
        "--providers",
        default=None,
        metavar="P1,P2",
        help="onnxruntime execution providers: cpu, cuda or full names (default: CUDA when onnxruntime-gpu sees a GPU, else CPU)",
    )
    add_selection_arguments(p, defaults_from_router=True)
    p.add_argument("prompt", nargs="+", help="prompt(s) to route (one JSON line each)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from loramux.router.runtime import Router
    from loramux.router.train import adapter_names_in

    names = adapter_names_in(args.adapters) if args.adapters else None
    with Router.load(args.router, base=args.base, adapters=names, providers=args.providers) as router:
        overrides = selection_overrides(args)
        for routing in router.route_batch(args.prompt, **overrides):
            out = routing.to_json()
            out["providers"] = router.providers
            print(json.dumps(out))
    return 0
