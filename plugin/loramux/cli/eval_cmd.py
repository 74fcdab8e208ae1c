"""loramux eval: task accuracy of a mix mode on BBH-style rows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loramux.cli.pool_args import add_pool_arguments, open_pool
from loramux.converters.atomic import atomic_output
from loramux.errors import LoramuxError
from loramux.eval_choices import DEFAULT_ROWS_PER_TASK, DEFAULT_WEIGHTS
from loramux.evaluate import evaluate, load_rows, mix_modes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy of a mix mode on rows {task, input, target} (greedy; exact and lenient match)",
        description=(
            "Answer every row of --data as one user turn of the base model's chat template, greedily, stopping at the "
            "end of the turn, under the mix --mix chooses for it. Each answer is scored twice. exact: it equals the target "
            "after whitespace and case normalisation. lenient (loramux.evaluate.lenient_match): after the same "
            "normalisation, trailing punctuation (. ! , ; :) and quotes at either end are ignored on both sides, and for "
            "an option-letter target (X) an answer whose leading option letter is X matches (written (X), X) or X., alone "
            "or followed by the option's text, or a bare X alone), unless it names another option too; nothing else is forgiven "
            "('yes, because ...' does not match 'yes'). Prints a per-task table with both accuracies and their macro "
            'averages; --json writes {"mix", "macro_accuracy", "macro_accuracy_lenient", "tasks": {task: {"accuracy", '
            '"accuracy_lenient", "n"}}, "rows": [{"task", "id", "answer", "correct", "correct_lenient", "mix"}]} '
            "(accuracy and correct are exact match)."
        ),
        epilog=(
            "MODE: base (no adapter); oracle (the adapter named like the row's task); uniform (all loaded adapters, equal "
            "weights summing to 1); fixed:name=w,... (one mix for all rows); arrow[:k=3,T=1] or spectr[:k=4] (every token "
            "routed among all loaded adapters inside the graph: Arrow or SpectR, native library); router:PATH (a trained router). "
            f"Registered modes: {', '.join(mix_modes())}."
        ),
    )
    add_pool_arguments(p)
    p.add_argument("--data", type=Path, required=True, help="JSON-lines rows with task, input, target (and id)")
    p.add_argument("--mix", dest="mode", default="base", metavar="MODE", help="mix mode (default: base)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--limit-per-task", type=int, default=None, metavar="N", help="only the first N rows of each task (quick runs)")
    p.add_argument("--tasks", default=None, metavar="T1,T2", help="only these tasks (comma-separated)")
    p.add_argument("--max-tokens", type=int, default=None, help="token cap per answer (default: per task, longest target + 16)")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="answer one row at a time (each row decoded alone) instead of batching rows with different mixes "
        "(faster; a batch agrees with each row alone up to llama.cpp's batch floor, so a near-tie can flip)",
    )
    choices = p.add_argument_group(
        "token choices (per-token routing modes)",
        "After the eval, teacher-force the first rows of each task again, question and answer, with the native record on, "
        "and report which adapters their tokens chose: a line per task (its own adapter's rank, the top three), an SVG "
        "map of tasks x adapters, and token_choices in --json.",
    )
    choices.add_argument("--choices", type=Path, default=None, metavar="OUT.svg", help="draw the map of the routing choices to OUT.svg")
    choices.add_argument(
        "--choice-rows",
        type=int,
        default=DEFAULT_ROWS_PER_TASK,
        metavar="N",
        help=f"rows per task to record (default: {DEFAULT_ROWS_PER_TASK})",
    )
    choices.add_argument(
        "--choice-weights",
        default=",".join(DEFAULT_WEIGHTS),
        metavar="KINDS",
        help=f"kinds of base weight to average over, or 'all' (default: {','.join(DEFAULT_WEIGHTS)}, which every fixture adapts, "
        "so every adapter competes there)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.choices is not None and args.choice_rows < 1:
        raise LoramuxError(f"--choice-rows {args.choice_rows}: record at least 1 row per task")
    weights = None if args.choice_weights.strip() == "all" else [w.strip() for w in args.choice_weights.split(",") if w.strip()]
    rows = load_rows(args.data, tasks=tasks, limit_per_task=args.limit_per_task)
    with open_pool(args) as pool:
        result = evaluate(
            pool,
            rows,
            args.mode,
            max_tokens=args.max_tokens,
            batched=not args.sequential,
            choice_rows=args.choice_rows if args.choices is not None else 0,
            choice_weights=weights,
        )
    paths = ", ".join(f"{n} {k}" for k, n in sorted(result.extra.get("paths", {}).items()))
    print(f"mix mode: {args.mode}  ({len(rows)} rows, {result.extra.get('seconds')} s; paths: {paths})")
    print(result.table())
    if result.choice_map is not None:
        print(result.choice_map.summary())
        with atomic_output(args.choices) as tmp:
            tmp.write_text(result.choice_map.heatmap().svg(), encoding="utf-8")
        print(f"wrote {args.choices}", file=sys.stderr)
    if args.json:
        result.write_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
