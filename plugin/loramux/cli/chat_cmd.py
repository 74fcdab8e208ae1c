"""loramux chat: an interactive chat whose mix of adapters (or router) can change between turns."""

from __future__ import annotations

import argparse
import sys

from loramux.cli.mix_choice import MixChoice, mix_help, routing_note
from loramux.cli.pool_args import add_pool_arguments, open_pool
from loramux.errors import LoramuxError

HELP = """commands:
  /mix NAME=W,...   use this mix from the next turn on (/mix base: the base model; /mix alone: show it)
  /mix ROUTER       let a router pick the mix of every turn (e.g. /mix retrieval:keys.json, /mix logo)
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
        epilog=f"--mix and /mix: {mix_help()}; a router reads each turn's user message.",
    )
    add_pool_arguments(p)
    p.add_argument("--mix", default=None, metavar="MIX|ROUTER", help="the starting mix or router (default: the base model)")
    p.add_argument("--system", default=None, help="a system message (default: the chat template's own)")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default: 512)")
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature; 0 is greedy (default: 0.2)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.set_defaults(run=run)


class _Session:
    def __init__(self, pool, args: argparse.Namespace) -> None:
        self.pool, self.args = pool, args
        self.choice = MixChoice(pool, args.mix)
        self.messages = self._start()

    def _start(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.args.system}] if self.args.system else []

    def command(self, text: str) -> bool:
        """Run a /command; False to leave."""
        cmd, _, rest = text.partition(" ")
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            print(HELP)
        elif cmd == "/adapters":
            print(", ".join(self.pool.names) or "(no adapters loaded)")
        elif cmd == "/reset":
            self.messages = self._start()
            print("(conversation cleared)")
        elif cmd == "/mix":
            if rest.strip():
                try:
                    choice = MixChoice(self.pool, rest)
                except LoramuxError as exc:
                    print(f"error: {exc}")
                    return True
                self.choice.close()
                self.choice = choice
            print(f"(mix: {self.choice})")
        else:
            print(f"unknown command {cmd}; /help lists them")
        return True

    def answer(self, line: str) -> None:
        mix, routing = self.choice.for_prompt(line)
        if routing is not None:
            print(routing_note(routing, mix), file=sys.stderr)
        self.messages.append({"role": "user", "content": line})
        a = self.args
        chunks = self.pool.create_chat_completion(
            self.messages, mix=mix, stream=True, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed
        )
        reply = []
        for c in chunks:
            piece = c["choices"][0]["delta"].get("content") or ""
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        self.messages.append({"role": "assistant", "content": "".join(reply)})


def run(args: argparse.Namespace) -> int:
    with open_pool(args) as pool:
        session = _Session(pool, args)
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"loramux chat: {len(pool.names)} adapters, mix {session.choice}. /help for commands.", file=sys.stderr)
        try:
            while True:
                try:
                    line = input("> " if interactive else "")
                except EOFError:
                    break
                text = line.strip()
                if not text:
                    continue
                if text.startswith("/"):
                    if not session.command(text):
                        break
                    continue
                session.answer(line)
        finally:
            session.choice.close()
    return 0
