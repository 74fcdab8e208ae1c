"""loramux chat: an interactive chat whose mix of adapters can change between turns."""
from __future__ import annotations

import argparse
import sys

from loramux.cli.pool_args import add_pool_arguments, open_pool
from loramux.errors import MixError
from loramux.mix import Mix

HELP = """commands:
  /mix NAME=W,...   use this mix from the next turn on (/mix base: the base model; /mix alone: show it)
  /adapters         list the loaded adapters
  /reset            forget the conversation
  /help             this text
  /quit             leave (so does Ctrl-D)"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="interactive chat under a weighted mix of adapters (changeable with /mix)",
        description=(
            "Chat with the base model under a weighted mix of LoRA adapters. Each turn is answered through the base "
            "model's chat template with the whole conversation so far; /mix changes the mix between turns. "
            "Type /help inside for the commands."
        ),
    )
    add_pool_arguments(p)
    p.add_argument("--mix", type=Mix.parse, default=Mix(), metavar="NAME=W,...", help="the starting mix (default: the base model)")
    p.add_argument("--system", default=None, help="a system message (default: the chat template's own)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default: 512)")
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature; 0 is greedy (default: 0.2)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.set_defaults(run=run)


def _start(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def run(args: argparse.Namespace) -> int:
    with open_pool(args) as pool:
        mix = pool.resolve_mix(args.mix)
        messages = _start(args.system)
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"loramux chat: {len(pool.names)} adapters, mix {mix}. /help for commands.", file=sys.stderr)
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                cmd, _, rest = text.partition(" ")
                if cmd in ("/quit", "/exit"):
                    break
                if cmd == "/help":
                    print(HELP)
                elif cmd == "/adapters":
                    print(", ".join(pool.names) or "(no adapters loaded)")
                elif cmd == "/reset":
                    messages = _start(args.system)
                    print("(conversation cleared)")
                elif cmd == "/mix":
                    if rest.strip():
                        try:
                            mix = pool.resolve_mix(Mix.parse(rest))
                        except MixError as exc:
                            print(f"error: {exc}")
                            continue
                    print(f"(mix: {mix})")
                else:
                    print(f"unknown command {cmd}; /help lists them")
                continue
            messages.append({"role": "user", "content": line})
            chunks = pool.create_chat_completion(
                messages, mix=mix, stream=True, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
            )
            reply = []
            for c in chunks:
                piece = c["choices"][0]["delta"].get("content") or ""
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
