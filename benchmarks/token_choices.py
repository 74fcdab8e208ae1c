"""Which adapters the tokens of a mixed prompt choose under per-token routing, as a picture.

A prompt made of two BBH dev questions of different tasks (one after the other in one user turn)
is run once, teacher-forced, under Arrow (or SpectR) over the whole pool of 22 adapters, with the
per-token record on (``AdapterPool.token_choices``). For every prompt token, each adapter's share
is the sum of its routing weights over all adapted weights of all layers, divided by the number of
adapted weights: a column sums to 1. The picture (SVG, no plotting library needed) has one column
per token and one row per adapter; the two questions' tokens are marked. By default the shares
are taken over the q and v projections, which every fixture adapts (all 22 adapters compete there). The script also prints,
for each part, the adapters with the largest mean share and where the part's own task ranks.

    .venv/bin/python benchmarks/token_choices.py --out docs/token_choices.svg --json /tmp/token_choices.json
    .venv/bin/python benchmarks/token_choices.py --tasks snarks boolean_expressions --mix spectr
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
DEV = ROOT.parent / "shared" / "data" / "bbh" / "dev.jsonl"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--tasks", nargs=2, default=["boolean_expressions", "snarks"], help="the two tasks whose first dev questions form the prompt"
    )
    ap.add_argument("--mix", default="arrow", help="a per-token mode: arrow, arrow:k=3,T=1, spectr (default: arrow)")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "token_choices.svg", help="the SVG picture (default: docs/token_choices.svg)"
    )
    ap.add_argument("--json", type=Path, help="also write the shares here")
    ap.add_argument(
        "--weights",
        default="attn_q,attn_v",
        help="adapted weights to average over (default: attn_q,attn_v, which every fixture adapts; the FFN weights are "
        "routed among the five adapters that adapt them only)",
    )
    return ap.parse_args(argv)


def first_question(task: str) -> str:
    with DEV.open() as f:
        for line in f:
            row = json.loads(line)
            if row["task"] == task:
                return row["input"]
    raise SystemExit(f"no dev row of task {task!r} in {DEV}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from loramux import AdapterPool
    from loramux.mix import Mix
    from loramux.routing_picture import Heatmap

    questions = [first_question(t) for t in args.tasks]
    with AdapterPool(max_active=4) as pool:
        pool.load_adapters(FIXTURES, skip_embeddings=True)
        report = pool.token_choices("\n\n".join(questions), Mix.parse(args.mix))
    kinds = args.weights.split(",")
    adapters = sorted({a for c in report.select(kinds) for a in c.adapters} | set(args.tasks))
    share = report.shares(adapters, kinds)
    text = "".join(report.pieces)
    starts = [text.find(q) for q in questions]
    spans, result = [], {"mix": args.mix, "tasks": args.tasks, "parts": []}
    offsets = np.cumsum([0] + [len(p) for p in report.pieces])
    for task, q, start in zip(args.tasks, questions, starts):
        a = int(np.searchsorted(offsets, start, side="right") - 1)
        b = int(np.searchsorted(offsets, start + len(q), side="left"))
        spans.append((task, a, b))
        mean = share[:, a:b].mean(axis=1)
        order = list(np.argsort(-mean))
        rank = order.index(adapters.index(task)) + 1
        top = [(adapters[i], round(float(mean[i]), 3)) for i in order[:5]]
        result["parts"].append({"task": task, "tokens": [a, b], "top": top, "own_task_rank": rank})
        print(f"{task} tokens {a}-{b}: top {top}; its own adapter ranks {rank} of {len(adapters)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture = Heatmap(
        values=share,
        row_labels=adapters,
        title=f"{args.mix}: routing weight per prompt token (mean over the {args.weights} weights of all layers)",
        notes=(
            "columns: prompt tokens; shade: share of the routing weight (darkest = 0.5 or more)",
            f"first tokens: {' '.join(report.pieces[:40])[:200]}",
        ),
        spans=spans,
    )
    args.out.write_text(picture.svg())
    print(f"wrote {args.out}")
    if args.json:
        result["share"] = share.round(4).tolist()
        result["adapters"] = adapters
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
