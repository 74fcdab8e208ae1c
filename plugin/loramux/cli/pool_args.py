"""Options shared by the commands that open an adapter pool (run, chat, eval, demo)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from loramux.errors import MixError
from loramux.pool import AdapterPool, AdapterSkippedWarning
from loramux.progress import progress_bar
from loramux.token_routing import TokenRouting, is_routing_spec

DEFAULT_MAX_ACTIVE = 3  # AdapterPool's default


def add_pool_arguments(p: argparse.ArgumentParser, *, max_active: bool = True) -> None:
    """--base, --adapters (repeatable), --skip-embeddings, --threads, --n-ctx, --n-seq-max, --max-active, --verbose
    (``max_active=False``: a command that sizes max_active itself)."""
    p.add_argument("--base", type=Path, default=None, help="base model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument(
        "--adapters",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a GGUF LoRA file, a PEFT folder, or a folder of those (repeatable). PEFT folders are converted once "
        "into loramux's cache. Adapters found in a folder that the runtime cannot express are skipped with a warning",
    )
    p.add_argument(
        "--skip-embeddings",
        action="store_true",
        help="load PEFT adapters with an embedding LoRA the base cannot take (tied output, e.g. word_sorting) without "
        "that part, instead of skipping them (the rest stays exact; the result then differs from PEFT)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for llama.cpp (default: $LORAMUX_THREADS, else the number of cores, at most 8)",
    )
    p.add_argument("--n-ctx", type=int, default=2048, help="context of one request in tokens, prompt + answer (default: 2048)")
    p.add_argument("--n-seq-max", type=int, default=8, help="requests decoded together in one batch (default: 8)")
    if max_active:
        p.add_argument(
            "--max-active",
            type=int,
            default=None,
            help=f"most adapters of one mix run per sequence, and the largest top-k of arrow/spectr (default: {DEFAULT_MAX_ACTIVE}, "
            "or the k of a routed --mix when larger)",
        )
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def max_active_for(args: argparse.Namespace) -> int:
    """``--max-active`` if given, else DEFAULT_MAX_ACTIVE raised to the top-k of a routed ``--mix`` (so that
    ``--mix spectr``, top-4, runs as written; a bad spec is reported where the mix is parsed)."""
    if getattr(args, "max_active", None) is not None:
        return args.max_active
    spec = getattr(args, "mix", None) or getattr(args, "mode", None)
    if is_routing_spec(spec):
        with contextlib.suppress(MixError):
            return max(DEFAULT_MAX_ACTIVE, TokenRouting.parse(spec).k or 0)
    return DEFAULT_MAX_ACTIVE


def open_pool(args: argparse.Namespace) -> AdapterPool:
    """Load the base model and the adapters named by ``args``; report skipped adapters on stderr."""
    pool = AdapterPool(
        args.base, n_ctx=args.n_ctx, n_seq_max=args.n_seq_max, max_active=max_active_for(args), n_threads=args.threads, verbose=args.verbose
    )
    if args.adapters:
        try:
            with warnings.catch_warnings(record=True) as caught, progress_bar(desc="load adapters", unit="adapter") as bar:
                warnings.simplefilter("always", AdapterSkippedWarning)
                report = pool.load_adapters(args.adapters, skip_embeddings=args.skip_embeddings, progress=bar.update_to)
        except BaseException:
            pool.close()
            raise
        for w in caught:
            if not issubclass(w.category, AdapterSkippedWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for s in report.skipped:
            print(f"loramux: skipped adapter {s.name!r}: {s.reason}", file=sys.stderr)
    return pool
