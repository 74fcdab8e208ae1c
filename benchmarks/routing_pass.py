"""The cost of the data-free routers' pass: LoGo and pooled Arrow/SpectR against a plain prefill.

Each router's ``route`` teacher-forces the prompt once on the pool's engine under per-token routing
with the native record on (``logo``: LoGo's scores at one weight; ``pooled:*``: the shares over the
prompt) and reads the record. The plain prefill is the same tokens on the same engine under the base
model (``pool.logits``: logits on every row, as the routing passes compute them). Side by side in
one process, medians of ``--repeats``, on real BBH dev prompts near each ``--lengths``.

    .venv/bin/python benchmarks/routing_pass.py --repeats 7 --lengths 50,250,500 --json out/routing_pass.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from router import median_ms  # benchmarks/router.py (this folder is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
DEV = ROOT.parent / "shared" / "data" / "bbh" / "dev.jsonl"
SPECS = ("logo:cal=none", "logo", "pooled:arrow", "pooled:spectr", "pooled:logo-token")  # logo: cal=spectral


def prompts_near(pool, router, lengths: list[int]) -> dict[int, tuple[str, int]]:
    """For each length, the dev prompt whose request tokens are closest to it."""
    from loramux.evaluate import load_rows

    rows = load_rows(DEV)
    sizes = [(len(router.tokens(r["input"])), r["input"]) for r in rows[::7]]
    out = {}
    for n in lengths:
        n_tok, text = min(sizes, key=lambda s: abs(s[0] - n))
        out[n] = (text, n_tok)
    return out


def measure(args: argparse.Namespace) -> dict:
    from loramux.mix import Mix
    from loramux.pool import AdapterPool
    from loramux.router.registry import open_router

    out: dict = {"threads": args.threads, "repeats": args.repeats, "rows": {}}
    with AdapterPool(n_threads=args.threads, n_ctx=2048) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool.load_adapters(ADAPTERS, skip_embeddings=True)
        routers = {spec: open_router(spec, pool) for spec in SPECS}
        for n, (text, n_tok) in prompts_near(pool, routers["logo"], args.lengths).items():
            ids = routers["logo"].tokens(text)
            row = {"tokens": n_tok, "plain_prefill_ms": median_ms(lambda: pool.logits(ids, Mix(), path="native"), args.repeats)}
            for spec, router in routers.items():
                row[f"{spec} ms"] = median_ms(lambda r=router: r.route(text), args.repeats)
                row[f"{spec} / prefill"] = row[f"{spec} ms"] / row["plain_prefill_ms"]
            out["rows"][str(n)] = row
            print(json.dumps(row), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median; default: 5)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    ap.add_argument("--lengths", default="50,250,500", help="prompt lengths in tokens (default: 50,250,500)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    result = measure(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
