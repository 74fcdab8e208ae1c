"""LoGo's routing top-1 on same-recipe adapter pools and on the full heterogeneous pool (routing only).

For each pool (A, B, C, D: the fixture's same-recipe subsets, same rank, alpha, rsLoRA flag and
target modules; ``full``: all 22 adapters) and the first N BBH dev rows of each of the pool's tasks,
the share of rows whose top adapter is the row's own task, for:

- ``logo:cal=C`` (LoGo at the last prompt token, the last layer's attn_q) and ``logo:cal=C,layer=-8``;
- ``pooled:logo-token:cal=C`` (the per-token LoGo record pooled over the prompt's own tokens);
- chance, 1 / pool size;

with C in none, spectral, frobenius. One teacher-forced pass per (row, calibration): both routers'
answers are read from the same native record (``pool.token_choices``) with the library's own
functions, and on the first row of each pool they are checked against
``open_router(spec, pool).route(prompt)``, so the figures are the shipped routers'. No generation.

    .venv/bin/python benchmarks/logo_pools.py --json out/i27/logo_pools.json --markdown /work/results/logo_pools.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
DEV = ROOT.parent / "shared" / "data" / "bbh" / "dev.jsonl"
POOLS: dict[str, tuple[str, ...] | None] = {
    "A": (
        "boolean_expressions",
        "formal_fallacies",
        "logical_deduction_three_objects",
        "penguins_in_a_table",
        "snarks",
        "tracking_shuffled_objects_three_objects",
    ),
    "B": ("causal_judgement", "geometric_shapes", "movie_recommendation", "reasoning_about_colored_objects", "sports_understanding"),
    "C": ("disambiguation_qa", "hyperbaton", "navigate", "ruin_names", "temporal_sequences"),
    "D": (
        "dyck_languages",
        "logical_deduction_seven_objects",
        "object_counting",
        "salient_translation_error_detection",
        "tracking_shuffled_objects_seven_objects",
    ),
    "full": None,  # every adapter folder of the fixture (word_sorting without its embedding LoRA)
}
RECIPES = {
    "A": "r=8, alpha=16, q/k/v/o",
    "B": "r=8, alpha=16, q/v",
    "C": "r=4, alpha=8, all seven",
    "D": "r=16, alpha=16, rsLoRA, q/v",
    "full": "all 22, mixed",
}
CALS = ("none", "spectral", "frobenius")


def variant_specs(cal: str) -> list[str]:
    """The router specs read from one pass under ``logo-token:k=3,cal=cal`` (each spec is its variant's label)."""
    return [f"logo:cal={cal}", f"logo:cal={cal},layer=-8", f"pooled:logo-token:cal={cal}"]


VARIANTS = [spec for cal in CALS for spec in variant_specs(cal)]


def open_pool(name: str, args: argparse.Namespace):
    """An AdapterPool with the pool's adapters loaded."""
    from loramux.pool import AdapterPool

    pool = AdapterPool(None, n_ctx=2048, n_seq_max=2, max_active=3, n_threads=args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if POOLS[name] is None:
            pool.load_adapters(ADAPTERS, skip_embeddings=True)
        else:
            for task in POOLS[name]:
                pool.load(ADAPTERS / task)
    return pool


def logo_top(choices: Any, tensor: str, last: int) -> tuple[str, dict[str, float]]:
    """LogoRouter's answer from a record: the row at ``tensor`` and the last prompt token."""
    rows = [c for c in choices if c.module == tensor and c.pos == last]
    if not rows:
        raise SystemExit(f"no record row at {tensor}, position {last}")
    scores = dict(zip(rows[0].adapters, rows[0].weights))
    return max(scores, key=lambda n: (scores[n], n)), scores


def pooled_top(choices: Any, span: Any, weights: frozenset[str]) -> tuple[str, dict[str, float]]:
    """PooledRouter's answer (defaults: span=content, at=shared, baseline=template) from a record."""
    from loramux.router.pooled import EPS, pooled_shares

    shares = pooled_shares(choices, span.start, span.end, weights)
    outside = [c for c in choices if not span.start <= c.pos < span.end]
    template = pooled_shares(outside, 0, len(span.tokens), weights)
    scores = {n: (s + EPS) / (template.get(n, 0.0) + EPS) for n, s in shares.items()}
    ranked = sorted(scores, key=lambda n: (-scores[n], n))
    return (ranked[0] if ranked else ""), scores


def route_row(pool: Any, prompt: str, ctx: dict[str, Any]) -> tuple[dict[str, str], dict[str, float], dict[str, dict]]:
    """One pass per calibration: each variant's top adapter, each pass's seconds, each variant's scores."""
    from loramux.mix import Mix
    from loramux.router.pooled import chat_prompt_span

    span = chat_prompt_span(pool, prompt, min(pool.n_batch, pool.n_ctx))
    tops: dict[str, str] = {}
    seconds: dict[str, float] = {}
    scores: dict[str, dict] = {}
    for cal in CALS:
        t0 = time.perf_counter()
        choices = pool.token_choices(span.tokens, Mix.logo_token(k=3, calibration=cal)).choices
        seconds[cal] = time.perf_counter() - t0
        for label in variant_specs(cal):
            if label.startswith("pooled:"):
                tops[label], scores[label] = pooled_top(choices, span, ctx["shared"])
            else:
                tops[label], scores[label] = logo_top(choices, ctx["tensors"][label], len(span.tokens) - 1)
    return tops, seconds, scores


def check_shipped(routers: dict[str, Any], prompt: str, tops: dict[str, str], scores: dict[str, dict]) -> None:
    """The derived answers are the shipped routers' own (top-1 and scores)."""
    for label, router in routers.items():
        routing = router.route(prompt)
        same = set(routing.scores) == set(scores[label]) and all(
            abs(routing.scores[n] - scores[label][n]) <= 1e-9 * max(1.0, abs(scores[label][n])) for n in scores[label]
        )
        if routing.top1 != tops[label] or not same:
            raise SystemExit(f"{label}: derived {tops[label]} {scores[label]} != router {routing.top1} {routing.scores}")


def run_pool(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Route the first N dev rows of each of the pool's tasks; per-row tops and per-pass seconds."""
    from loramux.evaluate import load_rows
    from loramux.router.pooled import shared_weights
    from loramux.router.registry import open_router

    t_pool = time.perf_counter()
    pool = open_pool(name, args)
    try:
        names = sorted(pool.names)
        routers = {spec: open_router(spec, pool) for spec in VARIANTS}
        ctx = {"shared": shared_weights(pool), "tensors": {k: r.tensor for k, r in routers.items() if hasattr(r, "tensor")}}
        n = args.n_full if name == "full" else args.n
        rows = load_rows(DEV, tasks=names, limit_per_task=n)
        results, seconds = [], {cal: [] for cal in CALS}
        for i, row in enumerate(rows):
            tops, secs, scores = route_row(pool, row["input"], ctx)
            if i == 0:
                check_shipped(routers, row["input"], tops, scores)
            results.append({"task": row["task"], "id": row["id"], "tops": tops})
            for cal, s in secs.items():
                seconds[cal].append(s)
            print(f"[{name} {i + 1}/{len(rows)}] {row['task']}: " + " ".join(f"{v}={t}" for v, t in tops.items()), flush=True)
    finally:
        pool.close()
    return summarize(name, names, n, results, seconds, time.perf_counter() - t_pool)


def summarize(name: str, names: list[str], n: int, results: list[dict], seconds: dict[str, list[float]], wall: float) -> dict[str, Any]:
    """Top-1 per variant (overall and per task), the most chosen adapter per variant, pass timings."""
    top1, per_task, dominant = {}, {}, {}
    for v in VARIANTS:
        hits = [r["tops"][v] == r["task"] for r in results]
        top1[v] = sum(hits) / len(hits)
        per_task[v] = {t: statistics.mean(h for r, h in zip(results, hits) if r["task"] == t) for t in names}
        winner, count = Counter(r["tops"][v] for r in results).most_common(1)[0]
        dominant[v] = {"adapter": winner, "share": count / len(results)}
    return {
        "pool": name,
        "recipe": RECIPES[name],
        "adapters": names,
        "size": len(names),
        "rows_per_task": n,
        "rows": len(results),
        "chance": 1.0 / len(names),
        "top1": top1,
        "per_task_top1": per_task,
        "most_chosen": dominant,
        "pass_ms_median": {cal: 1e3 * statistics.median(s) for cal, s in seconds.items()},
        "pass_ms_mean": {cal: 1e3 * statistics.mean(s) for cal, s in seconds.items()},
        "wall_s": wall,
        "results": results,
    }


def command_line() -> str:
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(str(ROOT)) else sys.executable
    return shlex.join([exe, os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def markdown(out: dict[str, Any]) -> str:
    """The top-1 table (pools x variants), pass timings, and the full pool's best variant per task."""
    lines = ["```", out["command"], "```", "", f"Wall time: {out['wall_s']:.0f} s; llama.cpp threads: {out['threads']}.", ""]
    lines += ["| pool | recipe | size | rows | chance | " + " | ".join(f"`{v}`" for v in VARIANTS) + " |"]
    lines += ["| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in VARIANTS) + " |"]
    for p in out["pools"]:
        best = max(p["top1"].values())
        cells = [f"**{p['top1'][v]:.2f}**" if p["top1"][v] == best else f"{p['top1'][v]:.2f}" for v in VARIANTS]
        lines.append(f"| {p['pool']} | {p['recipe']} | {p['size']} | {p['rows']} | {p['chance']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Most chosen adapter (share of the pool's rows) per pool, per variant:", ""]
    lines += ["| pool | " + " | ".join(f"`{v}`" for v in VARIANTS) + " |", "| --- | " + " | ".join("---" for _ in VARIANTS) + " |"]
    for p in out["pools"]:
        cells = [f"{p['most_chosen'][v]['adapter']} {p['most_chosen'][v]['share']:.2f}" for v in VARIANTS]
        lines.append(f"| {p['pool']} | " + " | ".join(cells) + " |")
    lines += ["", "One routing pass (median ms) per calibration, and the pool's wall time:", ""]
    lines += ["| pool | " + " | ".join(f"cal={c}" for c in CALS) + " | wall s |", "| --- |" + " ---: |" * (len(CALS) + 1)]
    for p in out["pools"]:
        lines.append(f"| {p['pool']} | " + " | ".join(f"{p['pass_ms_median'][c]:.0f}" for c in CALS) + f" | {p['wall_s']:.0f} |")
    full = next((p for p in out["pools"] if p["pool"] == "full"), None)
    if full:
        best = max(VARIANTS, key=lambda v: full["top1"][v])
        lines += ["", f"Full pool, best variant `{best}` ({full['top1'][best]:.2f}), top-1 per task:", ""]
        lines += ["| task | top-1 |", "| --- | ---: |"]
        lines += [f"| {t} | {x:.2f} |" for t, x in full["per_task_top1"][best].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10, help="dev rows per task for the subsets A-D (default: 10)")
    ap.add_argument("--n-full", type=int, default=5, help="dev rows per task for the full pool (default: 5)")
    ap.add_argument("--pools", default=",".join(POOLS), help=f"comma-separated pools (default: {','.join(POOLS)})")
    ap.add_argument(
        "--threads", type=int, default=2, help="llama.cpp threads (default: 2; on cores shared with other jobs 1 can be far faster)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the figures and per-row tops as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help="write the Markdown tables here too")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"command": command_line(), "threads": args.threads, "variants": VARIANTS, "pools": []}
    for name in args.pools.split(","):
        out["pools"].append(run_pool(name, args))
    out["wall_s"] = time.perf_counter() - t0
    text = markdown(out)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
