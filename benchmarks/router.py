"""Router latency against the generation it steers, side by side in one run.

For a ~50-token and a ~500-token prompt (real BBH dev prompts, the closest in length; the text the
generation sees as the user turn):

1. routing latency on ONE CPU thread (onnxruntime ``intra_op_num_threads=1``): tokenize (the base
   model's tokenizer through llama.cpp), the onnxruntime run alone, and selection (numpy), p50 and
   p99 over --iters calls each, then the whole route (tokenize + run + select);
2. the generation the route precedes: prefill + 32 greedy tokens of the same prompt (chat template,
   end-of-generation banned so every request decodes 32 tokens) through ``AdapterPool`` under the
   routed mix, median over --repeats (interleaved with the routing rounds);
3. routing as a share of that generation (p50 route / median generation);
4. the DLP-LoRA-style baseline the seeds describe: an ALBERT-base sized classifier (~12M parameters
   over raw text) built from its configuration with random weights (no download; latency does not
   depend on the weights), run by torch on one thread on the same number of tokens (ids drawn at
   random: its own sentencepiece tokenizer is not available here, so its tokenization is not counted).
5. the same router on onnxruntime's CUDA provider when available (onnxruntime-gpu and a GPU);
6. the training-free routers beside it, on the same prompts and pool (22 adapters): retrieval
   (``token_meanmax``, ``token_mean`` and ``hidden:-8`` keys) and LoGo (one forward
   pass with the 22 adapters set), median over --repeats; LoGo's pass against a plain prefill of
   the same chat prompt (base model, nothing captured) on the same probe context;
7. LoraHub: the time of one optimiser round (8 candidate mixes of the 22 adapters x 5 examples of a
   held-out task), scored in one batch against one candidate at a time, median over --repeats.

Run:

    .venv/bin/python benchmarks/router.py                          # trains a router first if --router is absent
    .venv/bin/python benchmarks/router.py --router out/router.onnx --json /tmp/router_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ADAPTERS = SHARED / "fixtures" / "smollm2-bbh-lora"
BBH = SHARED / "data" / "bbh"
GEN_TOKENS = 32


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def pick_prompt(router, rows: list[dict], target: int) -> tuple[str, int]:
    """The dev prompt whose token count is closest to ``target`` (prompts are joined if none is long enough)."""
    lengths = [(abs(len(router.token_ids(r["input"])) - target), r["input"]) for r in rows]
    best = min(lengths, key=lambda x: x[0])[1]
    text = best
    while len(router.token_ids(text)) < 0.9 * target:
        text = text + "\n\n" + best
    return text, len(router.token_ids(text))


def time_calls(fn, iters: int) -> list[float]:
    for _ in range(min(50, iters)):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def routing_figures(router, text: str, iters: int) -> dict:
    from loramux.router.selection import select

    ids = router.token_ids(text)
    batch = [ids]
    logits = router.logits_for_ids(batch)[0]
    tok = time_calls(lambda: router.token_ids(text), iters)
    run = time_calls(lambda: router.logits_for_ids(batch), iters)
    sel = time_calls(lambda: select(logits, router.adapters, router.settings, none_outcome=router.metadata.none_outcome), iters)
    route = time_calls(lambda: router.route(text), iters)
    return {
        "tokens": int(len(ids)),
        "tokenize_ms": {"p50": pct(tok, 50), "p99": pct(tok, 99)},
        "onnx_ms": {"p50": pct(run, 50), "p99": pct(run, 99)},
        "select_ms": {"p50": pct(sel, 50), "p99": pct(sel, 99)},
        "route_ms": {"p50": pct(route, 50), "p99": pct(route, 99)},
    }


def generation_ms(pool, text: str, mix, ban: dict) -> float:
    t = time.perf_counter()
    out = pool.create_chat_completion([{"role": "user", "content": text}], mix=mix, max_tokens=GEN_TOKENS, temperature=0.0, logit_bias=ban)
    ms = (time.perf_counter() - t) * 1e3
    n = out["usage"]["completion_tokens"]
    if n != GEN_TOKENS:
        raise RuntimeError(f"expected {GEN_TOKENS} generated tokens, got {n}")
    return ms


def albert_figures(lengths: list[int], iters: int) -> dict:
    import torch
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.set_num_threads(1)
    # albert-base-v2's published configuration; 22 labels like the router
    config = AlbertConfig(
        vocab_size=30000,
        embedding_size=128,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        num_labels=22,
    )
    model = AlbertForSequenceClassification(config).eval()
    params = sum(p.numel() for p in model.parameters())
    out = {"parameters": int(params), "fp32_mb": params * 4 / 1e6}
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        n = min(n, config.max_position_embeddings)
        ids = torch.randint(5, config.vocab_size, (1, n), generator=g)
        with torch.inference_mode():
            times = time_calls(lambda: model(input_ids=ids), iters)
        out[str(n)] = {"p50": pct(times, 50), "p99": pct(times, 99)}
    return out


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def training_free_figures(pool, prompts: dict, repeats: int) -> dict:
    """Per prompt: route latency of retrieval (two token features and a hidden state). LoGo's and the pooled
    routers' passes are timed against a plain prefill by benchmarks/routing_pass.py."""
    from loramux.evaluate import load_rows
    from loramux.router.retrieval import RetrievalRouter, build_keys, samples_by_adapter

    # latency does not depend on how many samples built a key: 20 per adapter for token_mean, 2 for hidden:-8
    rows = load_rows(BBH / "train.jsonl")
    routers = {
        f"retrieval {f}": RetrievalRouter(build_keys(pool, samples_by_adapter(rows, pool.names, n), feature=f), pool)
        for f, n in (("token_meanmax", 20), ("token_mean", 20), ("hidden:-8", 2))
    }
    return {
        str(n): {name: median_ms(lambda r=r: r.route(text), repeats) for name, r in routers.items()} for n, (text, _) in prompts.items()
    }


def compose_figures(base: Path, repeats: int) -> dict:
    """One LoraHub optimiser round (8 candidates x 5 examples, 22 adapters): batched vs one candidate at a time."""
    import warnings

    from loramux.compose import CompositionObjective, example_items
    from loramux.evaluate import load_rows
    from loramux.pool import AdapterPool

    examples = load_rows(BBH / "train.jsonl", tasks=["web_of_lies"], limit_per_task=5)
    rng = np.random.default_rng(0)
    with AdapterPool(base, n_ctx=1024, n_seq_max=16, n_batch=4096, max_active=22) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool.load_adapters(ADAPTERS, skip_embeddings=True)
        weights = [rng.uniform(-1.5, 1.5, len(pool.names)) for _ in range(8)]
        items = example_items(pool, examples)
        batched = CompositionObjective(pool, pool.names, items, 0.05, True)
        alone = CompositionObjective(pool, pool.names, items, 0.05, False)
        same = np.allclose(batched.nll(weights), alone.nll(weights), atol=2e-3)
        fig = {
            "candidates": 8,
            "examples": len(items),
            "tokens_per_candidate": sum(len(t) for t, _ in items),
            "batched_round_ms": median_ms(lambda: batched.nll(weights), repeats),
            "one_at_a_time_round_ms": median_ms(lambda: alone.nll(weights), repeats),
            "same_losses": bool(same),
        }
    fig["speedup"] = fig["one_at_a_time_round_ms"] / fig["batched_round_ms"]
    return fig


def ensure_router(path: Path | None) -> Path:
    if path is not None:
        return path
    from loramux.base_model import default_base_model
    from loramux.evaluate import load_rows
    from loramux.router.train import train_router

    out = Path(tempfile.mkdtemp(prefix="loramux-router-bench-")) / "router.onnx"
    print(f"training a router into {out} ...", file=sys.stderr)
    train_router(default_base_model(), ADAPTERS, load_rows(BBH / "train.jsonl"), out)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--router", type=Path, default=None, help="router .onnx (default: train one on the train split first)")
    ap.add_argument("--iters", type=int, default=1000, help="routing calls per figure (default: 1000)")
    ap.add_argument("--repeats", type=int, default=5, help="generations per prompt (default: 5)")
    ap.add_argument("--albert-iters", type=int, default=20, help="ALBERT forward passes per length (default: 20)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the generation (default: 2)")
    ap.add_argument("--lengths", default="50,500", help="prompt lengths in tokens (default: 50,500)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    return ap.parse_args()


def prompt_figures(pool, router, text: str, args: argparse.Namespace, ban: dict) -> dict:
    """Routing latency and the generation it steers for one prompt, interleaved over --repeats rounds."""
    mix = router.route(text).mix
    gens, routes = [], []
    generation_ms(pool, text, mix, ban)  # warm-up (loads the mix, fills caches)
    for _ in range(args.repeats):
        routes.append(routing_figures(router, text, max(50, args.iters // args.repeats)))
        pool.clear_prefix_cache()  # no prompt prefix reuse: every generation prefills its prompt
        gens.append(generation_ms(pool, text, mix, ban))
    merged = {"tokens": routes[0]["tokens"]}
    for key in ("tokenize_ms", "onnx_ms", "select_ms", "route_ms"):
        merged[key] = {q: statistics.median(r[key][q] for r in routes) for q in ("p50", "p99")}
    merged["mix"] = mix.to_dict()
    merged["generation_ms"] = {"median": statistics.median(gens), "min": min(gens)}
    merged["route_share_of_generation"] = merged["route_ms"]["p50"] / merged["generation_ms"]["median"]
    merged["onnx_share_of_generation"] = merged["onnx_ms"]["p50"] / merged["generation_ms"]["median"]
    return merged


def eog_ban(pool) -> dict:
    """Logit bias that bans end of generation, so every request decodes GEN_TOKENS tokens."""
    ban = {pool.token_eos(): -1e9}
    for tok in pool.tokenize("<|im_end|>", special=True):
        ban[tok] = -1e9
    return ban


def measure(args: argparse.Namespace, router_path: Path) -> dict:
    import warnings

    import onnxruntime as ort

    from loramux.evaluate import load_rows
    from loramux.pool import AdapterPool
    from loramux.router import Router
    from loramux.router.runtime import CUDA

    rows = load_rows(BBH / "dev.jsonl")
    lengths = [int(x) for x in args.lengths.split(",")]
    result: dict = {"router": str(router_path), "router_file_mb": router_path.stat().st_size / 1e6, "prompts": {}}
    with AdapterPool(n_threads=args.threads, n_ctx=2048) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool.load_adapters(ADAPTERS, skip_embeddings=True)
        ban = eog_ban(pool)
        with Router.load(router_path, pool=pool, threads=1, providers="cpu") as router:
            result["providers"] = router.providers
            prompts = {n: pick_prompt(router, rows, n) for n in lengths}
            for n, (text, _) in prompts.items():
                result["prompts"][str(n)] = prompt_figures(pool, router, text, args, ban)
        if CUDA in ort.get_available_providers():
            with Router.load(router_path, pool=pool, threads=1, providers="cuda") as gpu:
                result["cuda"] = {"providers": gpu.providers}
                for n, (text, _) in prompts.items():
                    result["cuda"][str(n)] = routing_figures(gpu, text, args.iters)
        result["training_free"] = training_free_figures(pool, prompts, args.repeats)
    result["lorahub_round"] = compose_figures(pool.base_path, args.repeats)
    result["albert_baseline"] = albert_figures([p["tokens"] for p in result["prompts"].values()], args.albert_iters)
    return result


def print_routing(result: dict) -> None:
    print(f"router file: {result['router_file_mb']:.1f} MB, providers {result['providers']}, onnxruntime 1 thread")
    print(
        f"{'prompt':>8} {'tokenize p50/p99':>18} {'onnx p50/p99':>16} {'route p50/p99':>16} {'prefill+32 tok':>15} {'route share':>12} {'onnx share':>11} {'ALBERT p50':>11}"
    )
    for p in result["prompts"].values():
        al = result["albert_baseline"].get(str(min(p["tokens"], 512)), {})
        print(
            f"{p['tokens']:>5} tk "
            f"{p['tokenize_ms']['p50']:>8.3f}/{p['tokenize_ms']['p99']:<8.3f} ms"
            f"{p['onnx_ms']['p50']:>7.3f}/{p['onnx_ms']['p99']:<6.3f} ms"
            f"{p['route_ms']['p50']:>7.3f}/{p['route_ms']['p99']:<6.3f} ms"
            f"{p['generation_ms']['median']:>12.1f} ms"
            f"{100 * p['route_share_of_generation']:>11.2f}%"
            f"{100 * p['onnx_share_of_generation']:>10.3f}%"
            f"{al.get('p50', float('nan')):>9.1f} ms"
        )
    ab = result["albert_baseline"]
    print(
        f"ALBERT-base-sized classifier (DLP-LoRA style): {ab['parameters'] / 1e6:.1f} M parameters, {ab['fp32_mb']:.0f} MB fp32, torch 1 thread"
    )
    for n, p in result.get("cuda", {}).items():
        if n != "providers":
            print(f"CUDA {p['tokens']} tokens: onnx p50 {p['onnx_ms']['p50']:.3f} ms, route p50 {p['route_ms']['p50']:.3f} ms")


def main() -> int:
    args = parse_args()
    result = measure(args, ensure_router(args.router))
    print_routing(result)
    print_training_free(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def print_training_free(result: dict) -> None:
    print(f"\n{'prompt':>8} {'onnx route p50':>15} " + " ".join(f"{k:>22}" for k in next(iter(result["training_free"].values()))))
    for n, row in result["training_free"].items():
        onnx = result["prompts"][n]["route_ms"]["p50"]
        print(f"{result['prompts'][n]['tokens']:>5} tk {onnx:>12.3f} ms " + " ".join(f"{v:>19.3f} ms" for v in row.values()))
    lh = result["lorahub_round"]
    print(
        f"LoraHub round ({lh['candidates']} candidates x {lh['examples']} examples, {lh['tokens_per_candidate']} tokens "
        f"each): batched {lh['batched_round_ms']:.0f} ms, one at a time {lh['one_at_a_time_round_ms']:.0f} ms "
        f"({lh['speedup']:.2f}x; same losses: {lh['same_losses']})"
    )


if __name__ == "__main__":
    sys.exit(main())
