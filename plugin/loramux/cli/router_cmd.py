"""loramux router: train a router (``router train``), build retrieval keys (``router index``), show a router file (``router info``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from loramux.cli.pool_args import add_pool_arguments, open_pool
from loramux.progress import progress_bar
from loramux.router.retrieval import SAMPLES_PER_ADAPTER
from loramux.router.selection import FALLBACKS, SelectionSettings

_DEFAULTS = SelectionSettings()


def add_selection_arguments(p: argparse.ArgumentParser, *, defaults_from_router: bool) -> None:
    """--top-k, --top-p, --temperature, --min-weight, --threshold, --fallback, --fallback-weight."""
    where = "the router's default" if defaults_from_router else "default"
    g = p.add_argument_group("selection (how scores become a mix)")
    g.add_argument("--top-k", type=int, default=None, help=f"keep at most K adapters ({where}: {_DEFAULTS.top_k})")
    g.add_argument(
        "--top-p",
        type=float,
        default=None,
        help=f"nucleus: keep the most probable adapters until their renormalised mass reaches P ({where}: {_DEFAULTS.top_p})",
    )
    g.add_argument(
        "--temperature", type=float, default=None, help=f"softmax temperature on the router's logits ({where}: {_DEFAULTS.temperature})"
    )
    g.add_argument(
        "--min-weight",
        type=float,
        default=None,
        help=f"drop adapters whose renormalised weight is below W ({where}: {_DEFAULTS.min_weight})",
    )
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"below this top adapter probability, use the fallback ({where}: {_DEFAULTS.threshold})",
    )
    g.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default=None,
        help=f"fallback mix: base = the base model alone, uniform = every adapter at fallback-weight/n ({where}: {_DEFAULTS.fallback})",
    )
    g.add_argument(
        "--fallback-weight", type=float, default=None, help=f"total weight of the uniform fallback ({where}: {_DEFAULTS.fallback_weight})"
    )


def selection_overrides(args: argparse.Namespace) -> dict:
    """The selection settings given on the command line (None where not given)."""
    return {
        "top_k": args.top_k,
        "top_p": args.top_p,
        "temperature": args.temperature,
        "min_weight": args.min_weight,
        "threshold": args.threshold,
        "fallback": args.fallback,
        "fallback_weight": args.fallback_weight,
    }


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "router",
        help="train a learned router (prompt -> mix) or show a router file",
        description="Learned routers: a small MLP over the base model's own token embeddings, exported to ONNX and run by onnxruntime.",
    )
    rsub = p.add_subparsers(dest="router_command", metavar="ACTION")
    _add_train_parser(rsub)
    _add_index_parser(rsub)
    _add_info_parser(rsub)
    p.set_defaults(run=lambda args: (p.print_help(), 1)[1])


def _add_train_parser(rsub: argparse._SubParsersAction) -> None:
    t = rsub.add_parser(
        "train",
        help="train a router on task-labelled rows and write it as ONNX",
        description=(
            "Train a router for the adapters under --adapters on the rows of --data ({task, input, ...} JSON lines): "
            "rows whose task names an adapter teach the router to pick it; rows of tasks without an adapter teach a "
            "'none of these' outcome (at most --none-per-task rows per such task; 0 leaves them out). Features: the "
            "prompt's token ids from the base model's tokenizer, mean-pooled over the base GGUF's token_embd "
            "(frozen), then a one-hidden-layer MLP. A stratified part of the rows is held out and scored at the end; "
            "--check scores more rows files. Needs the train and onnx extras (torch, onnx)."
        ),
        epilog="Example: loramux router train --adapters adapters/ --data train.jsonl --check dev.jsonl -o router.onnx",
    )
    t.add_argument("--base", type=Path, default=None, help="base model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    t.add_argument(
        "--adapters",
        type=Path,
        required=True,
        help="folder of adapters (GGUF files and/or PEFT folders): their names are the router's outcomes",
    )
    t.add_argument("--data", type=Path, required=True, help="training rows, JSON lines with task and input")
    t.add_argument("-o", "--output", type=Path, required=True, help="router file to write (.onnx)")
    t.add_argument(
        "--check",
        type=Path,
        action="append",
        default=[],
        metavar="ROWS",
        help="also report top-1 routing accuracy on these rows (repeatable)",
    )
    t.add_argument("--hidden", type=int, default=64, help="hidden width, also the width of the table in the ONNX file (default: 64)")
    t.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    t.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 0.003)")
    t.add_argument(
        "--none-per-task",
        type=int,
        default=5,
        help="rows per task without an adapter for the 'none' outcome (default: 5, the LoraHub limit; 0: no none outcome)",
    )
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of rows held out for the final check (default: 0.1)")
    t.add_argument("--max-tokens", type=int, default=1024, help="router reads at most this many prompt tokens (default: 1024)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_selection_arguments(t, defaults_from_router=False)
    t.set_defaults(run=run_train)


def _add_index_parser(rsub: argparse._SubParsersAction) -> None:
    x = rsub.add_parser(
        "index",
        help="build retrieval keys (no training): one key per adapter from a few of its prompts",
        description=(
            "Build the keys of the retrieval router: for every adapter under --adapters, the first "
            "--samples-per-adapter inputs of the --data rows whose task is the adapter's name (labels and targets are "
            "not used) are embedded with the base model (--feature), centred and averaged into the adapter's key. "
            "Use the keys with --mix retrieval:KEYS in loramux run, chat, eval and serve --router. An adapter added "
            "later needs only its own samples (RetrievalRouter.add), no rebuild."
        ),
        epilog=(
            "Features: token_meanmax (the mean and the maximum of the prompt's token embeddings: no forward pass), "
            "token_mean (the mean alone) or hidden:L (the mean "
            "residual stream after layer L of one forward pass; negative L counts from the end). "
            "Example: loramux router index --adapters adapters/ --data train.jsonl -o adapters/retrieval_keys.json"
        ),
    )
    add_pool_arguments(x)
    x.add_argument(
        "--data", type=Path, required=True, help="rows {task, input, ...} (JSON lines); a row belongs to the adapter named like its task"
    )
    x.add_argument(
        "--samples-per-adapter",
        type=int,
        default=SAMPLES_PER_ADAPTER,
        help=f"prompts per adapter key (default: {SAMPLES_PER_ADAPTER}, chosen by cross-validation on the train split: benchmarks/retrieval_cv.py)",
    )
    x.add_argument("--feature", default="token_meanmax", help="prompt embedding: token_meanmax (default), token_mean or hidden:L")
    x.add_argument("-o", "--output", type=Path, required=True, help="key file to write (JSON)")
    x.set_defaults(run=run_index)


def _add_info_parser(rsub: argparse._SubParsersAction) -> None:
    i = rsub.add_parser(
        "info",
        help="print a router file's metadata as JSON",
        description="Print what a router file says about itself: adapters, base model fingerprint, feature recipe, selection defaults, training summary.",
    )
    i.add_argument("router", type=Path, help="router .onnx file")
    i.set_defaults(run=run_info)


class _StageBars:
    """One progress bar per training stage (tokenize, train, ...), each closed when the next begins."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._stage: str | None = None
        self._bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self._stack.close()
            self._stack = contextlib.ExitStack()
            self._bar = self._stack.enter_context(progress_bar(desc=stage, unit="epoch" if stage == "train" else "row", total=total))
            self._stage = stage
        self._bar.update_to(done, total)

    def close(self) -> None:
        self._stack.close()


def run_train(args: argparse.Namespace) -> int:
    from loramux.base_model import default_base_model
    from loramux.evaluate import load_rows
    from loramux.router.train import TrainConfig, train_router

    selection = SelectionSettings().with_overrides(**selection_overrides(args))
    config = TrainConfig(
        hidden=args.hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        none_per_task=args.none_per_task,
        val_fraction=args.val_fraction,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    base = args.base or default_base_model()
    rows = load_rows(args.data)
    checks = {str(path): load_rows(path) for path in args.check}
    bars = _StageBars()
    try:
        result = train_router(
            base,
            args.adapters,
            rows,
            args.output,
            config=config,
            selection=selection,
            check_rows=checks,
            progress=bars,
            log=lambda m: print(m, file=sys.stderr),
        )
    finally:
        bars.close()
    meta = result.metadata
    print(
        f"trained a router over {len(meta.adapters)} adapters{' + none' if meta.none_outcome else ''} "
        f"({meta.training['trainable_parameters']} trainable parameters) on {meta.training['rows']} rows "
        f"in {result.seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in result.timings.items())})"
    )
    if result.validation:
        print(result.validation.summary())
    for check in result.checks:
        print(check.summary())
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from loramux.router.runtime import open_router_session

    _, meta = open_router_session(args.router)
    print(json.dumps(meta.to_json(), indent=1))
    return 0


def run_index(args: argparse.Namespace) -> int:
    from loramux.errors import LoramuxError
    from loramux.evaluate import load_rows
    from loramux.router.retrieval import build_keys, samples_by_adapter

    if args.samples_per_adapter < 1:
        raise LoramuxError(f"--samples-per-adapter must be at least 1, got {args.samples_per_adapter}")
    rows = load_rows(args.data)
    with open_pool(args) as pool:
        if not pool.names:
            raise LoramuxError("no adapters loaded: give --adapters DIR")
        samples = samples_by_adapter(rows, pool.names, args.samples_per_adapter)
        total = sum(len(v) for v in samples.values())
        with progress_bar(desc=f"embed ({args.feature})", unit="prompt", total=total) as bar:
            keys = build_keys(pool, samples, feature=args.feature, progress=bar.update)
    keys.save(args.output)
    print(f"wrote {args.output}: {len(keys.keys)} adapter keys from {total} prompts ({args.feature})")
    return 0
