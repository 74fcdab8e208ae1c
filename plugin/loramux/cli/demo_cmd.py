"""loramux demo: prompts of several tasks, each routed to its mix with no training, all answered in one batch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loramux.errors import LoramuxError
from loramux.evaluate import exact_match, lenient_match
from loramux.pool import AdapterPool

# examples/ at the top of the source tree (plugin/loramux/cli/demo_cmd.py -> repository root).
SOURCE_EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
PROMPTS = "demo_prompts.jsonl"
SAMPLES = "retrieval_samples.jsonl"


def default_examples_dir() -> Path:
    """The repository's examples/: beside the sources (editable install) or in the current folder (wheel install)."""
    for candidate in (SOURCE_EXAMPLES, Path.cwd() / "examples"):
        if (candidate / PROMPTS).is_file():
            return candidate
    return Path.cwd() / "examples"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="route prompts of several tasks to their adapters (no training) and answer them in one batch",
        description=(
            "Fetch the default base model if needed, load the demo adapters shipped in examples/adapters/ (PEFT "
            "folders, converted to GGUF once and cached), build a retrieval router from the sample prompts in "
            f"examples/{SAMPLES} (one key per adapter: no training, no labels), let it choose the mix of every prompt "
            f"of examples/{PROMPTS}, and answer all of them greedily in one batch of different mixes; then the "
            "same prompts with the base model, also in one batch. Prints each answer beside its mix, marked by the lenient "
            "match of loramux eval (the same rule for both), the counts right (lenient and exact), and both times."
        ),
    )
    p.add_argument("--base", type=Path, default=None, help="base model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument(
        "--examples", type=Path, default=None, help=f"folder with adapters/, {PROMPTS} and {SAMPLES} (default: the repository's examples/)"
    )
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens per answer (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp")
    p.set_defaults(run=run)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise LoramuxError(f"{path} not found; pass --examples with the folder holding {PROMPTS}, {SAMPLES} and adapters/")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _answer_all(pool: AdapterPool, prompts: list[dict], mixes: list, max_tokens: int) -> tuple[list, float]:
    from loramux.pool_requests import PoolRequest

    reqs = [PoolRequest(messages=[{"role": "user", "content": p["prompt"]}], mix=m, max_tokens=max_tokens) for p, m in zip(prompts, mixes)]
    start = time.perf_counter()
    results = pool.generate(reqs)
    return results, time.perf_counter() - start


MARK_RULE = (
    "answers marked by lenient match, routed and base alike: trailing punctuation and quotes ignored, a leading option "
    "letter taken for its option; see loramux eval --help"
)


def _mark(answer: str, item: dict) -> str:
    """Mark an answer "ok" or "x" by :func:`loramux.evaluate.lenient_match`, the same rule for the routed and the
    base answers ("" when the prompt has no expected answer)."""
    if "expected" not in item:
        return ""
    return "ok" if lenient_match(answer, str(item["expected"])) else "x"


def _exact(answer: str, item: dict) -> bool:
    return "expected" in item and exact_match(answer, str(item["expected"]))


def _counts(results: list, prompts: list[dict]) -> tuple[int, int]:
    """How many answers are right by the demo's mark (lenient match), and how many by exact match."""
    lenient = sum(_mark(r.text, p) == "ok" for r, p in zip(results, prompts))
    return lenient, sum(_exact(r.text, p) for r, p in zip(results, prompts))


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[:width] + "...")


def _print(prompts: list[dict], routed: list, base: list) -> None:
    print(f"({MARK_RULE})")
    for i, (item, r, b) in enumerate(zip(prompts, routed, base), 1):
        text = " ".join(item["prompt"].split())
        print(f"[{i}] ({item.get('task', '?')}) {text[:100]}{'...' if len(text) > 100 else ''}")
        print(f"    expected {item.get('expected', '?')!r}")
        mix = ", ".join(f"{k}={v:.2f}" for k, v in r.mix.items()) or "base"
        print(f"    routed  {mix:<44} -> {_short(r.text)} [{_mark(r.text, item)}]")
        print(f"    base    {'':<44} -> {_short(b.text)} [{_mark(b.text, item)}]")


def run(args: argparse.Namespace) -> int:
    from loramux.router.retrieval import RetrievalRouter, build_keys, samples_by_adapter

    examples = args.examples or default_examples_dir()
    prompts = _read_jsonl(examples / PROMPTS)
    samples = _read_jsonl(examples / SAMPLES)
    adapters = examples / "adapters"
    if not adapters.is_dir():
        raise LoramuxError(f"demo adapters {adapters} not found; pass --examples with the folder holding adapters/")
    # one sequence per prompt, so that every prompt decodes in the same batch
    with AdapterPool(args.base, n_ctx=2048, n_threads=args.threads, n_seq_max=max(8, len(prompts))) as pool:
        pool.load_adapters(adapters)
        start = time.perf_counter()
        keys = build_keys(pool, samples_by_adapter(samples, pool.names, 20))
        router = RetrievalRouter(keys, pool)
        mixes = [router.route(p["prompt"]).mix for p in prompts]
        route_s = time.perf_counter() - start
        print(
            f"loramux demo: base {pool.base_path.name}; adapters {', '.join(pool.names)}; retrieval keys from "
            f"{sum(keys.samples.values())} sample prompts, {len(prompts)} prompts routed in {route_s:.2f} s\n"
        )
        routed, routed_s = _answer_all(pool, prompts, mixes, args.max_tokens)
        base, base_s = _answer_all(pool, prompts, [None] * len(prompts), args.max_tokens)
        _print(prompts, routed, base)
        paths = sorted({r.path for r in routed})
        right, exact = _counts(routed, prompts)
        right_base, exact_base = _counts(base, prompts)
    n = len(prompts)
    print(
        f"\nrouted mixes: {right}/{n} right (lenient; {exact}/{n} exact), {n} prompts in one batch ({', '.join(paths)} path) "
        f"in {routed_s:.1f} s; base model: {right_base}/{n} right (lenient; {exact_base}/{n} exact) in {base_s:.1f} s"
    )
    print("(mixes are exact output-space sums of the adapters' deltas; the router needed no training)", file=sys.stderr)
    return 0
