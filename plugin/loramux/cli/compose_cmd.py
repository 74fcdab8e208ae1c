"""loramux compose: LoraHub weights for the pool's adapters from a few labelled examples."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loramux.cli.pool_args import add_pool_arguments
from loramux.compose import BOUND, BUDGET, MAX_EXAMPLES, POPULATION, REG


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compose",
        help="LoraHub: compose the adapters into one mix from a few examples (gradient-free)",
        description=(
            f"Find weights in [-{BOUND:g}, {BOUND:g}] for the adapters under --adapters that minimise the mean "
            f"cross-entropy of the examples' targets under the mix, plus {REG:g} x mean |w|, with nevergrad's NGOpt "
            f"(LoraHub's optimiser) in --budget evaluations. The candidates of one round are scored together: every "
            f"candidate x example is one sequence with its own mix, in one batch. Writes the mix as JSON (use it with "
            f"--mix file:MIX.json, or in loramux serve's config) and, with --gguf, one GGUF adapter holding exactly "
            f"that mix (rank concatenation; with --mode lorahub, the A/B merge). Needs the compose extra (nevergrad)."
        ),
        epilog=(
            f"--examples: JSON lines {{input, target}} (at most {MAX_EXAMPLES}, LoraHub's few-shot setting; extra "
            "keys ignored). Example: loramux compose --adapters adapters/ --examples few.jsonl -o mix.json --gguf mix.gguf"
        ),
    )
    add_pool_arguments(p, max_active=False)
    p.add_argument("--examples", type=Path, required=True, help=f"JSON lines with input and target (1 to {MAX_EXAMPLES})")
    p.add_argument("-o", "--output", type=Path, required=True, help="mix file to write (JSON)")
    p.add_argument("--gguf", type=Path, default=None, help="also write the mix as one GGUF adapter (rank concatenation, f32)")
    p.add_argument("--budget", type=int, default=BUDGET, help=f"optimiser evaluations (default: {BUDGET}, LoraHub's)")
    p.add_argument("--population", type=int, default=POPULATION, help=f"candidates per round, scored in one batch (default: {POPULATION})")
    p.add_argument("--seed", type=int, default=0, help="optimiser seed (default: 0)")
    p.add_argument(
        "--mode",
        choices=("output", "lorahub"),
        default="output",
        help="output: the exact output-space sum of the adapters' deltas (default); lorahub: LoraHub's own "
        "merge, A and B each summed with the weights (cross terms; adapters of one rank, alpha and modules)",
    )
    p.add_argument("--sequential", action="store_true", help="score one candidate at a time (same losses; for timing the batch)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from loramux.compose import compose, read_examples
    from loramux.converters.atomic import atomic_output
    from loramux.converters.mix_gguf import write_averaged_gguf, write_mix_gguf
    from loramux.progress import progress_bar

    examples = read_examples(args.examples)
    with _compose_pool(args) as pool:
        with progress_bar(desc="compose", unit="eval", total=args.budget) as bar:

            def report(done: int, best: float) -> None:
                bar.update_to(done, args.budget)
                bar.set_postfix(loss=f"{best:.4f}")

            result = compose(
                pool,
                examples,
                budget=args.budget,
                population=args.population,
                seed=args.seed,
                batched=not args.sequential,
                mode=args.mode,
                progress=report,
            )
        files = {n: pool.adapters[n].gguf_path for n in result.mix}
        base = pool.base_path
    with atomic_output(args.output) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
    print(
        f"loss {result.base_nll:.4f} (base model) -> {result.loss:.4f} in {result.evaluations} evaluations, "
        f"{result.seconds:.1f} s; mix {result.mix}",
        file=sys.stderr,
    )
    print(f"wrote {args.output}")
    if args.gguf is not None:
        if args.mode == "lorahub":
            write_averaged_gguf(result.mix, files, base, args.gguf)
        else:
            write_mix_gguf(result.mix, files, base, args.gguf)
        print(f"wrote {args.gguf}")
    return 0


def _compose_pool(args: argparse.Namespace):
    """A pool wide enough to score mixes of every adapter per sequence."""
    import warnings

    from loramux.errors import LoramuxError
    from loramux.pool import AdapterPool, AdapterSkippedWarning

    if not args.adapters:
        raise LoramuxError("give --adapters DIR: the adapters to compose")
    from loramux.adapters import find_adapter_sources

    n = max(1, sum(len(find_adapter_sources(p)[0]) for p in args.adapters))
    pool = AdapterPool(
        args.base,
        n_ctx=args.n_ctx,
        n_seq_max=max(args.n_seq_max, 16),
        n_threads=args.threads,
        n_batch=4096,
        max_active=n,
        verbose=args.verbose,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AdapterSkippedWarning)
            pool.load_adapters(args.adapters, skip_embeddings=args.skip_embeddings)
    except BaseException:
        pool.close()
        raise
    return pool
