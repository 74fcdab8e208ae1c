"""Retrieval routing accuracy per prompt feature: top-1 on every dev row of the 22 adapter tasks.

For each --feature: keys from the first 20 train inputs of each adapter's task (`build_keys`, as
`loramux router index` does), then every dev row routed (`RetrievalRouter.route`); prints top-1
accuracy (the highest-weight adapter is the row's task), the mean weight given to the row's
task, the time to build the keys and the median route time, and the most frequent confusions.

    .venv/bin/python benchmarks/retrieval.py --features token_meanmax token_mean --json out/retrieval.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
BBH = ROOT.parent / "shared" / "data" / "bbh"


def one_feature(pool, feature: str, train, dev) -> dict:
    from loramux.router.retrieval import RetrievalRouter, build_keys, samples_by_adapter

    t0 = time.perf_counter()
    router = RetrievalRouter(build_keys(pool, samples_by_adapter(train, pool.names, 20), feature=feature), pool)
    index_s = time.perf_counter() - t0
    hits, weight, times, misses = 0, 0.0, [], collections.Counter()
    for row in dev:
        t0 = time.perf_counter()
        routing = router.route(row["input"])
        times.append((time.perf_counter() - t0) * 1e3)
        hits += routing.top1 == row["task"]
        weight += routing.mix.get(row["task"], 0.0)
        if routing.top1 != row["task"]:
            misses[f"{row['task']} -> {routing.top1}"] += 1
    return {
        "top1": hits / len(dev),
        "rows": len(dev),
        "mean_weight_on_task": weight / len(dev),
        "index_s": round(index_s, 2),
        "route_ms_p50": statistics.median(times),
        "confusions": dict(misses.most_common(5)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", nargs="+", default=["token_meanmax", "token_mean"])
    ap.add_argument("--limit-per-task", type=int, default=None, help="only the first N dev rows of each task")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from loramux.evaluate import load_rows
    from loramux.pool import AdapterPool

    with AdapterPool(n_ctx=2048, n_seq_max=2) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool.load_adapters(ADAPTERS, skip_embeddings=True)
        train = load_rows(BBH / "train.jsonl", tasks=pool.names)
        dev = load_rows(BBH / "dev.jsonl", tasks=pool.names, limit_per_task=args.limit_per_task)
        result = {f: one_feature(pool, f, train, dev) for f in args.features}
    for f, r in result.items():
        print(
            f"{f:<16} top-1 {r['top1']:.3f} on {r['rows']} rows, weight on the task {r['mean_weight_on_task']:.3f}, "
            f"keys {r['index_s']} s, route p50 {r['route_ms_p50']:.2f} ms; misses {r['confusions']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
