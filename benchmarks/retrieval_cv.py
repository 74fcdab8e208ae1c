"""Retrieval routing settings chosen by cross-validation on the train split only, then scored on dev.

Protocol (issue 27):

1. the train rows of the 22 adapter tasks are split into --folds folds, stratified by task (each
   task's rows shuffled with --seed, then dealt round-robin to the folds);
2. for every setting of the grid that can change the top-1 adapter (the prompt feature x the number
   of train inputs per task used as keys, the first N of the training folds in file order, as
   ``loramux router index --samples-per-adapter N`` takes them; ``all`` = every one), keys are built
   from the training folds with the library (`samples_by_adapter`, `build_keys`) and every row of
   the held-out fold is routed (`RetrievalRouter.route`); top-1 = the share of rows whose top-1
   adapter (the highest-weight one) is the row's task;
3. the setting with the highest mean CV top-1 is chosen; a tie (the same mean to 1e-9) goes to the
   cheaper setting: token_mean before token_meanmax (half the width), then fewer keys;
4. only then: keys from the whole train split with every setting, top-1 on every dev row of the 22
   tasks. The chosen setting's dev number is the result; the others are printed for comparison and
   were not used for choosing.

k, T, weights and min_weight are not in the grid: `retrieval_weights` keeps the k most similar
adapters in order of cosine and never drops the first, so the top-1 is the highest cosine whatever
they are. The script checks that on the chosen setting's dev rows (--check-settings).

    .venv/bin/python benchmarks/retrieval_cv.py --json out/retrieval_cv.json --markdown out/retrieval_cv.md
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
BBH = ROOT.parent / "shared" / "data" / "bbh"
FEATURE_COST = {"token_mean": 0, "token_meanmax": 1}  # tie-break order: the narrower vector first
ALL = 10**9  # "all" samples per task


def stratified_folds(rows: list[dict], folds: int, seed: int) -> list[int]:
    """The fold of every row: each task's rows shuffled with ``seed`` and dealt round-robin."""
    by_task: dict[str, list[int]] = collections.defaultdict(list)
    for i, row in enumerate(rows):
        by_task[row["task"]].append(i)
    fold_of = [0] * len(rows)
    for task in sorted(by_task):
        idx = by_task[task][:]
        random.Random(f"{seed}:{task}").shuffle(idx)
        for j, i in enumerate(idx):
            fold_of[i] = j % folds
    return fold_of


def score(pool, feature: str, samples: int, key_rows: list[dict], eval_rows: list[dict], *, keep_scores: bool = False) -> dict:
    """Keys from ``key_rows`` (the library's own index path), every ``eval_rows`` row routed."""
    from loramux.router.retrieval import RetrievalRouter, build_keys, samples_by_adapter

    router = RetrievalRouter(build_keys(pool, samples_by_adapter(key_rows, pool.names, samples), feature=feature), pool)
    tops, scores = [], []
    for row in eval_rows:
        routing = router.route(row["input"])
        tops.append(routing.top1)
        if keep_scores:
            scores.append(routing.scores)
    hits = sum(t == r["task"] for t, r in zip(tops, eval_rows))
    return {"top1": hits / len(eval_rows), "hits": hits, "rows": len(eval_rows), "tops": tops, "scores": scores}


def setting_name(feature: str, samples: int) -> str:
    return f"{feature}, {'all' if samples >= ALL else samples} keys/task"


def cross_validate(pool, train: list[dict], grid: list[tuple[str, int]], folds: int, seed: int, log) -> dict:
    fold_of = stratified_folds(train, folds, seed)
    out = {}
    for feature, samples in grid:
        t0 = time.perf_counter()
        per_fold = []
        for f in range(folds):
            key_rows = [r for r, g in zip(train, fold_of) if g != f]
            held = [r for r, g in zip(train, fold_of) if g == f]
            per_fold.append(score(pool, feature, samples, key_rows, held)["top1"])
        out[(feature, samples)] = {"folds": per_fold, "mean": statistics.mean(per_fold), "sd": statistics.stdev(per_fold)}
        log(
            f"CV  {setting_name(feature, samples):<32} {out[(feature, samples)]['mean']:.4f} +- {out[(feature, samples)]['sd']:.4f} ({time.perf_counter() - t0:.0f} s)"
        )
    return out


def choose(cv: dict) -> tuple[str, int]:
    """Highest mean CV top-1; ties to the cheaper feature, then to fewer keys."""
    return min(cv, key=lambda s: (-round(cv[s]["mean"], 9), FEATURE_COST.get(s[0], 9), s[1]))


def per_task(rows: list[dict], tops: list[str]) -> dict[str, tuple[int, int]]:
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for row, top in zip(rows, tops):
        counts[row["task"]][0] += top == row["task"]
        counts[row["task"]][1] += 1
    return {t: (h, n) for t, (h, n) in sorted(counts.items())}


def settings_changed_top1(scores: list[dict[str, float]], tops: list[str]) -> dict:
    """Rows whose top-1 would differ under other k / T / weights / min_weight (expected: none)."""
    from loramux.router.retrieval import retrieval_weights

    grid = [
        {"k": k, "T": t, "weights": w, "min_weight": m}
        for k, t, w, m in itertools.product((1, 2, 3, 5, 22), (0.01, 0.05, 1.0), ("softmax", "uniform"), (0.0, 0.05, 0.3))
    ]
    changed = 0
    for sims, top in zip(scores, tops):
        names, values = list(sims), np.asarray(list(sims.values()))
        changed += any(names[int(retrieval_weights(values, s)[0][0])] != top for s in grid)
    return {"settings": len(grid), "rows": len(tops), "rows_changed": changed}


def dev_scores(pool, train: list[dict], dev: list[dict], grid: list[tuple[str, int]], chosen: tuple[str, int], log) -> dict:
    out = {}
    for feature, samples in grid:
        t0 = time.perf_counter()
        r = score(pool, feature, samples, train, dev, keep_scores=(feature, samples) == chosen)
        r["seconds"] = time.perf_counter() - t0
        out[(feature, samples)] = r
        log(f"dev {setting_name(feature, samples):<32} {r['top1']:.4f} ({r['hits']}/{r['rows']}, {r['seconds']:.0f} s)")
    return out


def confusions(rows: list[dict], tops: list[str], n: int = 5) -> list[tuple[str, int]]:
    misses = collections.Counter(f"{r['task']} -> {t}" for r, t in zip(rows, tops) if t != r["task"])
    return misses.most_common(n)


def markdown(cv: dict, dev: dict, chosen: tuple[str, int], dev_rows: list[dict], meta: dict) -> str:
    lines = [
        f"| setting | CV top-1 on train ({meta['folds']} folds, mean ± sd) | dev top-1 (not used for choosing) |",
        "| --- | ---: | ---: |",
    ]
    for s in cv:
        mark = " **(chosen)**" if s == chosen else ""
        lines.append(
            f"| {setting_name(*s)}{mark} | {cv[s]['mean']:.4f} ± {cv[s]['sd']:.4f} | {dev[s]['top1']:.4f} ({dev[s]['hits']}/{dev[s]['rows']}) |"
        )
    d = dev[chosen]
    lines += ["", f"Chosen: **{setting_name(*chosen)}**, dev top-1 **{d['top1']:.4f}** ({d['hits']}/{d['rows']}).", ""]
    lines += ["| task | dev top-1 | rows |", "| --- | ---: | ---: |"]
    for task, (h, n) in per_task(dev_rows, d["tops"]).items():
        lines.append(f"| {task} | {h / n:.3f} | {n} |")
    lines += [
        "",
        "Most frequent misses (row's task -> top-1): " + "; ".join(f"{k} ({v})" for k, v in confusions(dev_rows, d["tops"])) + ".",
    ]
    lines += ["", f"k/T/weights/min_weight check: {meta['check']}. Wall time {meta['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", nargs="+", default=["token_mean", "token_meanmax"])
    ap.add_argument("--samples", nargs="+", default=["5", "10", "20", "40", "all"], help="train inputs per task used as keys")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    from loramux.evaluate import load_rows
    from loramux.pool import AdapterPool

    t_start = time.perf_counter()
    log = lambda m: print(m, flush=True)  # noqa: E731
    grid = [(f, ALL if n == "all" else int(n)) for f in args.features for n in args.samples]
    with AdapterPool(n_ctx=2048, n_seq_max=2) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool.load_adapters(ADAPTERS, skip_embeddings=True)
        train = load_rows(BBH / "train.jsonl", tasks=pool.names)
        dev = load_rows(BBH / "dev.jsonl", tasks=pool.names)
        cv = cross_validate(pool, train, grid, args.folds, args.seed, log)
        chosen = choose(cv)  # fixed before any dev row is routed
        log(f"chosen by CV: {setting_name(*chosen)}")
        dev_r = dev_scores(pool, train, dev, grid, chosen, log)
    check = settings_changed_top1(dev_r[chosen]["scores"], dev_r[chosen]["tops"])
    meta = {"folds": args.folds, "seed": args.seed, "check": check, "seconds": time.perf_counter() - t_start}
    text = markdown(cv, dev_r, chosen, dev, meta)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        result = {
            "meta": meta,
            "chosen": setting_name(*chosen),
            "cv": {setting_name(*s): v for s, v in cv.items()},
            "dev": {setting_name(*s): {k: v for k, v in r.items() if k not in ("tops", "scores")} for s, r in dev_r.items()},
            "dev_per_task": per_task(dev, dev_r[chosen]["tops"]),
            "dev_confusions": confusions(dev, dev_r[chosen]["tops"], 10),
        }
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
