"""Decode speed of per-request mixes on stock llama.cpp, and the cost of changing the mix between requests.

Side by side in one run, interleaved so that machine noise hits every configuration alike:

1. decode tokens/s for the base model, one adapter, a top-3 mix and a mix of all adapters
   (22 with --skip-embeddings), each request streaming --tokens tokens greedily through
   ``AdapterPool.create_completion`` (end-of-generation tokens banned so every request decodes
   the same number of tokens); decode time is the wall time from the first streamed token to
   the last, so the prompt is not counted (the first-token time, which includes the prompt and
   the scheduler rebuild after the mix change, is shown beside it);
2. the cost of a mix change: one random sequence of short requests (distinct prompts, so no
   prompt prefix is reused in either case) over two one-adapter mixes; requests that keep the
   previous request's mix are compared with requests that change it (a
   ``llama_set_adapters_lora`` call, a scheduler rebuild at the next decode and no graph
   reuse). The time of the call itself is reported too.

Figures are min and median over --repeats rounds. Run:

    .venv/bin/python benchmarks/mixes.py                       # all fixtures (../shared), defaults
    .venv/bin/python benchmarks/mixes.py --threads 2 --repeats 7 --json /tmp/mixes.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADAPTERS = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
ONE = "boolean_expressions"
TOP3 = {"boolean_expressions": 0.5, "navigate": 0.3, "sports_understanding": 0.2}
DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CHANGE_PROMPTS = [
    f"{w} is a word. Write one sentence about it:"
    for w in ("Apple", "River", "Mountain", "Candle", "Harbor", "Violin", "Desert", "Lantern", "Orchard", "Glacier", "Meadow", "Falcon")
]


def decode_round(pool, mix, n_tokens, ban):
    """One streamed request; returns (decode ms per token, ms to the first token).

    Decode time is the wall time from the first streamed token to the last, over n_tokens - 1
    tokens, so the prompt is not counted.
    """
    start = time.perf_counter()
    stamps = []
    for chunk in pool.create_completion(DECODE_PROMPT, mix=mix, max_tokens=n_tokens, temperature=0, logit_bias=ban, stream=True):
        stamps.append(time.perf_counter())
    if len(stamps) < n_tokens:
        raise RuntimeError(f"expected {n_tokens} streamed tokens, got {len(stamps)}")
    return (stamps[n_tokens - 1] - stamps[0]) * 1000 / (n_tokens - 1), (stamps[0] - start) * 1000


def request_ms(pool, mix, prompt, n_tokens, ban):
    start = time.perf_counter()
    pool.create_completion(prompt, mix=mix, max_tokens=n_tokens, temperature=0, logit_bias=ban)
    return (time.perf_counter() - start) * 1000


def summary(values):
    return {"min": min(values), "median": statistics.median(values)}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="base GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--adapters", type=Path, default=DEFAULT_ADAPTERS, help="folder of adapters (default: ../shared fixtures)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per request in part 1 (default 64)")
    ap.add_argument("--change-tokens", type=int, default=8, help="tokens per request in part 2 (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: $LORAMUX_THREADS or the cores)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    return ap.parse_args(argv)


def decode_speeds(pool, configs, args, ban):
    """Part 1: ms per decoded token and ms to the first token per configuration, interleaved round by round."""
    decode = {k: [] for k in configs}
    first_ms = {k: [] for k in configs}
    for mix in configs.values():  # warm-up, one each
        decode_round(pool, mix, 8, ban)
    for r in range(args.repeats):
        for label, mix in configs.items():
            ms_tok, p_ms = decode_round(pool, mix, args.tokens, ban)
            decode[label].append(ms_tok)
            first_ms[label].append(p_ms)
        print(f"  round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    return decode, first_ms


def mix_change_costs(pool, args, ban):
    """Part 2: requests that keep the previous request's mix against requests that change it.

    One random sequence, so load drifts hit both alike; prompts rotate, never sharing a prefix.
    Returns (kept ms list, changed ms list, llama_set_adapters_lora us per call, calls).
    """
    from loramux.mix import Mix

    a, b = Mix.one_hot(ONE), Mix.one_hot("navigate")
    same, alternating = [], []
    calls_before = pool.lora_stats.set_calls
    set_s_before = pool.lora_stats.set_seconds
    rng = random.Random(0)
    current = a
    request_ms(pool, current, CHANGE_PROMPTS[-1], args.change_tokens, ban)
    for i in range(args.repeats * 2 * len(CHANGE_PROMPTS)):
        change = rng.random() < 0.5
        if change:
            current = b if current == a else a
        ms = request_ms(pool, current, CHANGE_PROMPTS[i % len(CHANGE_PROMPTS)], args.change_tokens, ban)
        (alternating if change else same).append(ms)
    set_calls = pool.lora_stats.set_calls - calls_before
    set_us = (pool.lora_stats.set_seconds - set_s_before) / max(set_calls, 1) * 1e6
    return same, alternating, set_us, set_calls


def decode_rows(configs, decode, first_ms):
    """Print the decode table; returns its rows for the JSON."""
    rows = []
    base_tps = 1000 / statistics.median(decode["base"])
    print(f"\n{'configuration':<22}{'decode tok/s (median)':>23}{'best':>8}{'vs base':>9}{'first token ms':>20}")
    for label in configs:
        s = summary(decode[label])
        tps_med, tps_best = 1000 / s["median"], 1000 / s["min"]
        first = statistics.median(first_ms[label])
        rows.append(
            {
                "config": label,
                "adapters": len(configs[label]),
                "decode_tokens_per_s_median": tps_med,
                "decode_tokens_per_s_best": tps_best,
                "first_token_ms_median": first,
            }
        )
        print(f"{label:<22}{tps_med:>23.1f}{tps_best:>8.1f}{tps_med / base_tps:>8.2f}x{first:>20.1f}")
    return rows


def mix_change_figures(args, same, alternating, set_us, set_calls):
    """Print the cost of a mix change; returns it for the JSON."""
    s_same, s_alt = summary(same), summary(alternating)
    print(f"\nrequests of {args.change_tokens} tokens, randomly interleaved (prompts never share a prefix):")
    print(f"  same mix as the previous request ({len(same)}):  median {s_same['median']:.1f} ms, min {s_same['min']:.1f} ms")
    print(f"  mix changed since the previous ({len(alternating)}):  median {s_alt['median']:.1f} ms, min {s_alt['min']:.1f} ms")
    print(
        f"  cost of a change: {s_alt['median'] - s_same['median']:+.1f} ms (median), {s_alt['min'] - s_same['min']:+.1f} ms (min); "
        f"llama_set_adapters_lora itself {set_us:.1f} us per call ({set_calls} calls)"
    )
    return {
        "tokens": args.change_tokens,
        "kept_ms": s_same,
        "changed_ms": s_alt,
        "delta_ms_median": s_alt["median"] - s_same["median"],
        "set_call_us": set_us,
        "set_calls": set_calls,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from loramux.mix import Mix
    from loramux.pool import AdapterPool

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool = AdapterPool(args.base, n_ctx=1024, n_threads=args.threads)
        pool.load_adapters(args.adapters, skip_embeddings=True)
    with pool:
        names = pool.names
        ban = {t: -1e9 for t in eog_tokens(pool)}  # every request decodes exactly the asked number of tokens
        configs = {
            "base": Mix(),
            "one adapter": Mix.one_hot(ONE),
            "top-3 mix": Mix(TOP3),
            f"all {len(names)} (uniform)": Mix.uniform(names),
        }
        for mix in configs.values():
            pool.resolve_mix(mix)
        threads = pool.n_threads
        print(f"base {pool.base_path.name}, {len(names)} adapters, {threads} thread(s), {args.repeats} rounds", flush=True)
        decode, first_ms = decode_speeds(pool, configs, args, ban)
        change = mix_change_costs(pool, args, ban)

    result = {
        "base": str(pool.base_path.name),
        "threads": threads,
        "repeats": args.repeats,
        "tokens": args.tokens,
        "decode": decode_rows(configs, decode, first_ms),
        "mix_change": mix_change_figures(args, *change),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def eog_tokens(pool) -> list[int]:
    """The vocabulary's end-of-generation tokens (llama.cpp stops at any of them)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(pool.model.model)
    return [t for t in range(pool.model.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


if __name__ == "__main__":
    sys.exit(main())
