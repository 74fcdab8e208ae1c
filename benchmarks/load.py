"""The cost of loading and unloading one adapter, against the size of the pool it joins.

Each adapter load puts one adapter into a slot of the native pool: the library reads that adapter
only and writes it into free slices of the stacks (in place), or, when they have no room for it,
builds the next pool by copying the other slots' stacked matrices (no re-read, no new
eigen-decomposition). The last column counts which way each pool's changes went. This measures, side by side in one run and interleaved round by round:

- ``load``: ``AdapterPool.load`` of one converted GGUF into a pool of N adapters (N = 3, and
  every fixture but the one loaded: 21 of 22);
- ``unload``: ``AdapterPool.unload`` of it again;
- ``first decode``: the first 1-token request after the load (the scheduler reserves once after a
  pool change), minus the same request in a round without a change.

Figures: median (min) ms over --repeats rounds per pool size, and the ratio of the largest pool's
median to the smallest's (1.0: independent of pool size). Run:

    .venv/bin/python benchmarks/load.py                      # pools of 3 and 21, 7 rounds
    .venv/bin/python benchmarks/load.py --sizes 3 10 21 --repeats 9 --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADAPTERS = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
LOADED = "sports_understanding"  # the adapter every round loads and unloads (q/v, r=8)
EMBEDDING = {"word_sorting"}  # converted without its embedding LoRA (tied output projection)


def convert_all(adapters: Path, base: Path, out: Path) -> dict[str, Path]:
    from loramux.converters import convert_peft_to_gguf

    files = {}
    for src in sorted(p for p in adapters.iterdir() if (p / "adapter_config.json").is_file()):
        files[src.name] = convert_peft_to_gguf(src, base, out / f"{src.name}.gguf", skip_embeddings=src.name in EMBEDDING)
    return files


def one_round(pool, path: Path, tokens: list[int]) -> dict[str, float]:
    """Load, first decode, unload, then a decode without a change: ms of each."""
    out = {}
    start = time.perf_counter()
    pool.load(path)
    out["load"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    pool.create_completion(tokens, max_tokens=1, temperature=0)
    first = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    pool.unload(path.stem)
    out["unload"] = (time.perf_counter() - start) * 1000
    pool.create_completion(tokens, max_tokens=1, temperature=0)  # the reserve after the unload
    start = time.perf_counter()
    pool.create_completion(tokens, max_tokens=1, temperature=0)
    out["first decode"] = first - (time.perf_counter() - start) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS, help="folder of PEFT adapters (default: the shared fixtures)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 21], help="pool sizes before the load (default: 3 21)")
    ap.add_argument("--repeats", type=int, default=7, help="rounds per pool size (default: 7)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the pool's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    from loramux.base_model import default_base_model
    from loramux.pool import AdapterPool

    base = default_base_model()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = convert_all(args.adapters, base, Path(tmp))
        others = [p for n, p in files.items() if n != LOADED]
        pools = {n: AdapterPool(base, n_ctx=256, n_seq_max=4, n_threads=args.threads) for n in args.sizes}
        try:
            if not all(p.native for p in pools.values()):
                raise SystemExit("the native library is not in use: adapter slots are the native pool's")
            for n, pool in pools.items():
                pool.load_adapters(others[:n])
            tokens = next(iter(pools.values())).tokenize("Is the following sentence plausible?", add_bos=True)
            runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.sizes}
            for _ in range(args.repeats):
                for n, pool in pools.items():  # interleaved: machine noise hits every size alike
                    runs[n].append(one_round(pool, files[LOADED], tokens))
            changes = {n: (p.stats.pool_rebuilt, p.stats.pool_in_place) for n, p in pools.items()}
        finally:
            for pool in pools.values():
                pool.close()
    report(runs, changes, args)


def report(runs: dict[int, list[dict[str, float]]], changes: dict[int, tuple[int, int]], args) -> None:
    keys = ("load", "unload", "first decode")
    table = {n: {k: (statistics.median(r[k] for r in rs), min(r[k] for r in rs)) for k in keys} for n, rs in runs.items()}
    print(f"one adapter ({LOADED}) into a pool of N, {args.repeats} rounds; median (min) ms")
    print(f"{'N':>4}  " + "  ".join(f"{k:>18}" for k in keys) + "  pool changes: rebuilt / in place")
    for n, row in table.items():
        print(f"{n:>4}  " + "  ".join(f"{row[k][0]:>9.1f} ({row[k][1]:>6.1f})" for k in keys) + f"  {changes[n][0]} / {changes[n][1]}")
    small, large = min(table), max(table)
    ratios = {k: table[large][k][0] / table[small][k][0] for k in keys if table[small][k][0] > 0}
    print(f"median of N={large} / N={small}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps({"runs": {str(n): rs for n, rs in runs.items()}, "ratios": ratios, "changes": changes}, indent=1))


if __name__ == "__main__":
    main()
