"""The cost of a structured-output constraint in the engine (issue 26's first part).

N requests (default 8) decode together, greedily, each --tokens tokens at most, under three loads
interleaved round by round: none constrained, a quarter constrained, all constrained by a JSON
schema (an object with a free-text field, so answers run long). Reported: output tokens/s of the
whole batch, median (min) of --repeats rounds, and the ratio to the free load. A constrained
request runs llama.cpp's grammar sampler over the vocabulary at every token. Run:

    .venv/bin/python benchmarks/structured.py
    .venv/bin/python benchmarks/structured.py --requests 8 --tokens 48 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}, "year": {"type": "integer"}}, "required": ["story", "year"]}
PROMPTS = ["Tell a story about a lighthouse, as JSON.", "Describe a storm at sea, as JSON.", "Write about a fox, as JSON."]


def one_round(pool, n: int, constrained: int, tokens: int) -> float:
    from loramux.pool import PoolRequest
    from loramux.pool_requests import sampling_from

    rf = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
    reqs = [
        PoolRequest(
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=tokens,
            sampling=sampling_from({"temperature": 0, "response_format": rf if i < constrained else None}, chat=True),
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    results = pool.generate(reqs)
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8, help="requests decoded together (default: 8)")
    ap.add_argument("--tokens", type=int, default=48, help="most tokens per answer (default: 48)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (default: 3)")
    args = ap.parse_args()

    from loramux.pool import AdapterPool

    loads = {"free": 0, "25% constrained": max(1, args.requests // 4), "all constrained": args.requests}
    with AdapterPool(n_ctx=512, n_seq_max=args.requests) as pool:
        one_round(pool, 2, 1, 4)  # warm-up
        runs = {k: [] for k in loads}
        for _ in range(args.repeats):
            for label, c in loads.items():
                runs[label].append(one_round(pool, args.requests, c, args.tokens))
    free = statistics.median(runs["free"])
    print(f"{args.requests} requests x {args.tokens} tokens at most, {args.repeats} rounds; output tokens/s, median (min)")
    for label, r in runs.items():
        print(f"  {label:>16}: {statistics.median(r):7.1f} ({min(r):7.1f})   {statistics.median(r) / free:.2f}x free")


if __name__ == "__main__":
    main()
