"""loramux run: answer one prompt with the base model and a weighted mix of adapters."""

from __future__ import annotations

import argparse
import json
import sys

from loramux.cli.mix_choice import MixChoice, mix_help, routing_note
from loramux.cli.pool_args import add_pool_arguments, open_pool
from loramux.errors import LoramuxError
from loramux.router.registry import is_router_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="answer one prompt under a weighted mix of LoRA adapters",
        description=(
            "Load the base model once, load the adapters, and answer PROMPT as one user turn of the base model's "
            "chat template under the mix given with --mix: the exact output-space sum of the adapters' deltas, "
            "weighted. Without --mix the base model answers. The answer streams to stdout; the mix used goes to stderr."
        ),
        epilog=(
            f"--mix: {mix_help()}. "
            'Examples: loramux run --adapters adapters/ --mix boolean_expressions=1 "not ( True ) and False is"; '
            'loramux run --adapters adapters/ --mix retrieval:keys.json "not ( True ) and False is"'
        ),
    )
    add_pool_arguments(p)
    p.add_argument("--mix", default=None, metavar="MIX|ROUTER", help="the mix, or a router that picks it (default: the base model)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling p (default: 0.95)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (default: 40)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--completion", action="store_true", help="plain text completion of PROMPT, without the chat template")
    p.add_argument("--json", action="store_true", help='print the whole OpenAI-style response (with its "mix") as JSON')
    p.add_argument("--router", default=None, metavar="ROUTER", help="the same as --mix ROUTER (e.g. a trained router .onnx)")
    p.add_argument("prompt", help="the prompt")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.router is not None and args.mix is not None:
        raise LoramuxError("give either --mix or --router, not both")
    with open_pool(args) as pool:
        router = args.router
        if router is not None and not is_router_spec(router):
            router = f"router:{router}"
        choice = MixChoice(pool, router or args.mix)
        try:
            mix, routing = choice.for_prompt(args.prompt)
        finally:
            choice.close()
        sampling = dict(
            mix=mix, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
        if args.json:
            if args.completion:
                out = pool.create_completion(args.prompt, **sampling)
            else:
                out = pool.create_chat_completion([{"role": "user", "content": args.prompt}], **sampling)
            print(json.dumps(out, indent=1))
            return 0
        if args.completion:
            chunks = pool.create_completion(args.prompt, stream=True, **sampling)
            texts = (c["choices"][0]["text"] for c in chunks)
        else:
            chunks = pool.create_chat_completion([{"role": "user", "content": args.prompt}], stream=True, **sampling)
            texts = (c["choices"][0]["delta"].get("content") or "" for c in chunks)
        for text in texts:
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(routing_note(routing, mix), file=sys.stderr)
    return 0
