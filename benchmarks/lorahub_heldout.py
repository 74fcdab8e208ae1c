"""LoraHub on the five held-out BBH tasks (no adapter of theirs in the pool): composed mixes vs baselines.

For each held-out task (``../shared/data/bbh/tasks.json``) and each seed: ``compose`` (LoraHub:
nevergrad NGOpt, budget 40, 8 candidates per round scored in one batch, w in [-1.5, 1.5], 0.05 x
mean |w|) from the first five train rows of the task, over the 22 fixture adapters; then task
accuracy (``loramux eval``'s greedy exact match) on the task's first --dev-rows dev rows under:

- ``base``: no adapter;
- ``uniform``: the 22 adapters at 1/22 each;
- ``best single``: the one adapter whose mix {a: 1} has the lowest loss on the same five train
  examples (chosen with the information LoraHub has; not the best on dev);
- ``lorahub``: the composed mix, per seed (mean and spread over the seeds).

    .venv/bin/python benchmarks/lorahub_heldout.py --seeds 0 1 2 --dev-rows 20 --json out/lorahub.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ADAPTERS = SHARED / "fixtures" / "smollm2-bbh-lora"
BBH = SHARED / "data" / "bbh"


def accuracy(pool, rows, mix) -> float:
    from loramux.evaluate import evaluate
    from loramux.mix import Mix

    spec = "base" if not mix else "fixed:" + ",".join(f"{k}={v!r}" for k, v in Mix(mix).items())
    return evaluate(pool, rows, spec).macro_accuracy


def best_single(pool, examples) -> str:
    from loramux.compose import example_items
    from loramux.engine.scoring import ScoreItem
    from loramux.mix import Mix

    items = example_items(pool, examples)
    scored = pool.score([ScoreItem(t, n, Mix({a: 1.0})) for a in pool.names for t, n in items])
    per = {a: statistics.mean(scored[i * len(items) : (i + 1) * len(items)]) for i, a in enumerate(pool.names)}
    return min(per, key=per.get)


def one_task(pool, task: str, seeds, dev_rows: int) -> dict:
    from loramux.compose import compose
    from loramux.evaluate import load_rows
    from loramux.mix import Mix

    examples = load_rows(BBH / "train.jsonl", tasks=[task], limit_per_task=5)
    rows = load_rows(BBH / "dev.jsonl", tasks=[task], limit_per_task=dev_rows)
    single = best_single(pool, examples)
    out = {
        "base": accuracy(pool, rows, None),
        "uniform": accuracy(pool, rows, Mix.uniform(pool.names)),
        "best_single": accuracy(pool, rows, {single: 1.0}),
        "best_single_adapter": single,
        "lorahub": {},
    }
    for seed in seeds:
        t0 = time.perf_counter()
        result = compose(pool, examples, seed=seed)
        out["lorahub"][str(seed)] = {
            "accuracy": accuracy(pool, rows, result.mix),
            "loss": result.loss,
            "base_nll": result.base_nll,
            "compose_s": round(time.perf_counter() - t0, 1),
            "mix": result.mix.to_dict(),
        }
        print(
            f"{task} seed {seed}: {out['lorahub'][str(seed)]['accuracy']:.3f} (loss {result.base_nll:.3f} -> "
            f"{result.loss:.3f}, {out['lorahub'][str(seed)]['compose_s']} s)",
            file=sys.stderr,
        )
    accs = [v["accuracy"] for v in out["lorahub"].values()]
    out["lorahub_mean"] = statistics.mean(accs) if accs else float("nan")
    out["lorahub_sd"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="optimiser seeds (none: the baselines only)")
    ap.add_argument("--dev-rows", type=int, default=20, help="dev rows per task (default: 20)")
    ap.add_argument("--tasks", nargs="*", default=None, help="default: the five held-out tasks")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from loramux.pool import AdapterPool

    tasks = args.tasks or json.loads((BBH / "tasks.json").read_text())["heldout_tasks"]
    result: dict = {"seeds": args.seeds, "dev_rows": args.dev_rows, "tasks": {}}
    with AdapterPool(n_ctx=1024, n_seq_max=16, n_batch=4096, max_active=22) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool.load_adapters(ADAPTERS, skip_embeddings=True)
        for task in tasks:
            result["tasks"][task] = one_task(pool, task, args.seeds, args.dev_rows)
    cols = ("base", "uniform", "best_single", "lorahub_mean")
    result["macro"] = {c: statistics.mean(t[c] for t in result["tasks"].values()) for c in cols}
    print(f"{'task':<42}" + "".join(f"{c:>14}" for c in cols) + f"{'sd':>8}")
    for task, t in result["tasks"].items():
        print(f"{task:<42}" + "".join(f"{t[c]:>14.3f}" for c in cols) + f"{t['lorahub_sd']:>8.3f}")
    print(f"{'macro':<42}" + "".join(f"{result['macro'][c]:>14.3f}" for c in cols))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
