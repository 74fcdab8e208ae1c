"""loramux demo: a few prompts answered by the base model and by mixes of the shipped demo adapters."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loramux.errors import LoramuxError
from loramux.evaluate import normalize_answer
from loramux.pool import AdapterPool

# examples/ at the top of the source tree (plugin/loramux/cli/demo_cmd.py -> repository root).
SOURCE_EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def default_examples_dir() -> Path:
    """The repository's examples/: beside the sources (editable install) or in the current folder (wheel install)."""
    for candidate in (SOURCE_EXAMPLES, Path.cwd() / "examples"):
        if (candidate / "demo_prompts.jsonl").is_file():
            return candidate
    return Path.cwd() / "examples"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="answer a few prompts with the base model and with mixes of the demo adapters",
        description=(
            "Fetch the default base model if needed, load the demo adapters shipped in examples/adapters/ (PEFT "
            "folders, converted to GGUF once and cached), and answer the prompts of examples/demo_prompts.jsonl "
            "greedily: first with the base model, then with each prompt's mix. Prints each answer with the mix used."
        ),
    )
    p.add_argument("--base", type=Path, default=None, help="base model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--examples", type=Path, default=None, help="folder with adapters/ and demo_prompts.jsonl (default: the repository's examples/, found beside the sources or in the current folder)")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens per answer (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp")
    p.set_defaults(run=run)


def _read_prompts(path: Path) -> list[dict]:
    if not path.is_file():
        raise LoramuxError(f"demo prompts {path} not found; pass --examples with the folder holding demo_prompts.jsonl and adapters/")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run(args: argparse.Namespace) -> int:
    examples = args.examples or default_examples_dir()
    prompts = _read_prompts(examples / "demo_prompts.jsonl")
    adapters = examples / "adapters"
    if not adapters.is_dir():
        raise LoramuxError(f"demo adapters {adapters} not found; pass --examples with the folder holding adapters/")
    start = time.perf_counter()
    with AdapterPool(args.base, n_ctx=2048, n_threads=args.threads) as pool:
        pool.load_adapters(adapters)
        print(f"loramux demo: base {pool.base_path.name}, adapters {', '.join(pool.names)}\n")
        for i, item in enumerate(prompts, 1):
            messages = [{"role": "user", "content": item["prompt"]}]
            print(f"[{i}] {item['prompt']}")
            if "expected" in item:
                print(f"    expected: {item['expected']}")
            for mix in (None, item.get("mix")):
                out = pool.create_chat_completion(messages, mix=mix, temperature=0, max_tokens=args.max_tokens)
                answer = out["choices"][0]["message"]["content"] or ""
                mark = ""
                if "expected" in item:
                    mark = "  [ok]" if normalize_answer(answer) == normalize_answer(item["expected"]) else "  [x]"
                label = "base" if not out["mix"] else ",".join(f"{k}={v:g}" for k, v in out["mix"].items())
                print(f"    {label:<48} -> {_one_line(answer)!r}{mark}")
            print()
    print(f"({time.perf_counter() - start:.1f} s; mixes are exact output-space sums of the adapters' deltas)", file=sys.stderr)
    return 0
