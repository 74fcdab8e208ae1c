"""The engine's own work per decode step, outside llama_decode, at many sequences.

Every step the engine fills the batch, calls ``llama_decode``, then per row samples a token,
checks end-of-generation, turns the token into text and hands it to the request's consumer. This
measures what that costs on top of the decode itself: N requests (default 32, one per sequence)
run together greedily for --tokens tokens each (end-of-generation banned, so every step has N
rows), consumed from asyncio (the server's way) or from threads (the Python API's). Reported per
step: the wall time, the time inside ``llama_decode`` (``EngineStats.decode_seconds``) and their
difference (the engine's Python work, sampling and hand-off), median and min over --repeats
rounds. Run:

    .venv/bin/python benchmarks/step.py                        # 32 sequences, asyncio consumers
    .venv/bin/python benchmarks/step.py --sequences 32 --consumer threads --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path

PROMPTS = [f"Story number {i}: once upon a time, a {w}" for i, w in enumerate(["fox", "king", "ship", "tree"] * 16)]


def one_round(pool, n: int, tokens: int, consumer: str) -> dict[str, float]:
    from loramux.engine import EngineRequest, SamplingParams

    ban = {pool.token_eos(): -1e9}
    for t in (pool.tokenize("<|im_end|>", special=True) or [])[:1]:
        ban[t] = -1e9
    reqs = [
        EngineRequest(
            pool.tokenize(PROMPTS[i % len(PROMPTS)], add_bos=True),
            sampling=SamplingParams(temperature=0, logit_bias=ban),
            max_tokens=tokens,
        )
        for i in range(n)
    ]
    engine = pool._engine
    steps0, dec0 = engine.stats.steps, engine.stats.decode_seconds
    start = time.perf_counter()
    if consumer == "asyncio":

        async def run():
            loop = asyncio.get_running_loop()
            handles = [engine.submit(r, loop=loop) for r in reqs]

            async def drain(h):
                async for _ in h:
                    pass

            await asyncio.gather(*(drain(h) for h in handles))

        asyncio.run(run())
    else:
        handles = [engine.submit(r) for r in reqs]
        threads = [threading.Thread(target=lambda h=h: [None for _ in h]) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - start
    steps = engine.stats.steps - steps0
    decode = engine.stats.decode_seconds - dec0
    return {
        "steps": steps,
        "wall ms/step": wall * 1000 / steps,
        "decode ms/step": decode * 1000 / steps,
        "engine ms/step": (wall - decode) * 1000 / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32, help="requests decoded together (default: 32)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens each request generates (default: 48)")
    ap.add_argument("--consumer", choices=("asyncio", "threads"), default="asyncio", help="who reads the streams (default: asyncio)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (default: 5)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the pool's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    from loramux.pool import AdapterPool

    with AdapterPool(n_ctx=128, n_seq_max=args.sequences, n_threads=args.threads) as pool:
        one_round(pool, args.sequences, 8, args.consumer)  # warm-up
        runs = [one_round(pool, args.sequences, args.tokens, args.consumer) for _ in range(args.repeats)]
    keys = ("wall ms/step", "decode ms/step", "engine ms/step")
    print(f"{args.sequences} sequences x {args.tokens} tokens, {args.consumer} consumers, {args.repeats} rounds; median (min)")
    for k in keys:
        print(f"  {k:>15}: {statistics.median(r[k] for r in runs):7.2f} ({min(r[k] for r in runs):7.2f})")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
