"""Serving throughput and latency over loopback: ``loramux serve`` against a stock llama-server.

N concurrent streaming clients (``--clients``, default 1 8 32), each with its own BIG-Bench Hard
chat prompt and, in the "mixed" load, its own top-3 mix drawn from the 21 non-embedding fixture
adapters, each sending ``--requests-per-client`` requests of ``--tokens`` greedy tokens
(end-of-generation tokens banned, so every answer has the same length). Side by side in one run,
per N, the servers started with the same adapters, context and threads:

  loramux  mixed | shared (one top-3 mix for all) | base (no adapter)   -- loramux serve --n-seq-max N
  stock    mixed | shared | base   -- llama-server -np N, the mix in llama-server's per-request
                                      ``lora`` field (every adapter listed)
  engine   mixed: the same requests through an AdapterPool in this process (no HTTP), for the cost
           of the HTTP layer

Reported per cell, as ``vllm bench serve`` reports them: completed, failed, output tokens/s,
TTFT p50/p99, ITL p50/p99, end-to-end p50 (ms); medians over ``--runs`` rounds (the configurations
interleaved in each round). Also the resident memory (peak VmHWM, current VmRSS) of both servers after each N.

    .venv/bin/python benchmarks/serve.py --clients 8 32 --runs 3 --json out/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
DEV = ROOT.parent / "shared" / "data" / "bbh" / "dev.jsonl"
SERVERS = ("loramux", "stock")
LOADS = ("mixed", "shared", "base")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (default: 1 8 32)")
    ap.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn (default: 2)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per answer (default: 64)")
    ap.add_argument("--runs", type=int, default=3, help="rounds; medians are reported (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of both servers (default: 2)")
    ap.add_argument("--n-ctx", type=int, default=512, help="context per sequence / slot (default: 512)")
    ap.add_argument(
        "--prompt-chars",
        type=int,
        default=200,
        help="cut each BBH prompt to this many characters, so decoding, not prefill, dominates (default: 200)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write every figure here")
    return ap.parse_args(argv)


# --- the load --------------------------------------------------------------------------------
def convert_adapters(dest: Path, base: Path) -> list[Path]:
    from loramux.converters import UnsupportedAdapterError, convert_peft_to_gguf

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for d in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        f = dest / f"{d.name}.gguf"
        try:
            if not f.exists():
                convert_peft_to_gguf(d, base, f)
            out.append(f)
        except UnsupportedAdapterError:  # word_sorting: an embedding LoRA on a tied output (21 remain)
            continue
    return out


def make_load(names: list[str], n: int, seed: int, prompt_chars: int) -> dict:
    rng = random.Random(seed)
    rows = [json.loads(line) for line in DEV.open()]
    rng.shuffle(rows)
    prompts = [r["input"][:prompt_chars] for r in rows]  # every cell of a run takes its own window: no prompt is cached for another

    def top3() -> dict[str, float]:
        picked = rng.sample(names, 3)
        w = [rng.random() + 0.2 for _ in picked]
        return {a: round(x / sum(w), 3) for a, x in zip(picked, w)}

    shared = top3()
    return {"prompts": prompts, "mixed": [top3() for _ in range(n)], "shared": [shared] * n, "base": [{}] * n}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarise(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    itl = [x for r in ok for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in ok)
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "ttft_p50_ms": ms(percentile([r["ttft"] for r in ok], 50)),
        "ttft_p99_ms": ms(percentile([r["ttft"] for r in ok], 99)),
        "itl_p50_ms": ms(percentile(itl, 50)),
        "itl_p99_ms": ms(percentile(itl, 99)),
        "e2e_p50_ms": ms(percentile([r["e2e"] for r in ok], 50)),
        "wall_s": round(wall, 2),
    }


# --- HTTP clients ----------------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, last, itl, chunks, usage = None, None, [], 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    ttft = ttft if ttft is not None else now - t0
                    if last is not None:
                        itl.append(now - last)
                    last, chunks = now, chunks + 1
    except httpx.HTTPError:
        return {"ok": False}
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ok": ttft is not None, "ttft": ttft, "itl": itl, "e2e": time.perf_counter() - t0, "tokens": tokens}


async def run_clients(url: str, bodies: list[list[dict]]) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(bodies) + 4)) as client:

        async def client_loop(mine: list[dict]) -> list[dict]:
            return [await stream_one(client, b) for b in mine]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(b) for b in bodies))
        wall = time.perf_counter() - t0
    return summarise([r for rs in per_client for r in rs], wall)


def prompt_of(load: dict, window: int, c: int, k: int, args) -> str:
    n = len(load["mixed"])
    return load["prompts"][((window * n + c) * args.requests_per_client + k) % len(load["prompts"])]


def request_bodies(server: str, load: dict, kind: str, args, ban: dict, lora_ids: dict[str, int], window: int) -> list[list[dict]]:
    n = len(load[kind])
    out = []
    for c in range(n):
        mine = []
        for k in range(args.requests_per_client):
            body = {
                "messages": [{"role": "user", "content": prompt_of(load, window, c, k, args)}],
                "max_tokens": args.tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": ban,
            }
            mix = load[kind][c]
            if server == "loramux":
                body["mix"] = mix
            else:  # llama-server: every adapter with an explicit scale (as loramux's hook sends it)
                body["lora"] = [{"id": i, "scale": mix.get(name, 0.0)} for name, i in lora_ids.items()]
            mine.append(body)
        out.append(mine)
    return out


# --- in-process engine (no HTTP) ------------------------------------------------------------------
def engine_run(pool, load: dict, args, ban: dict, window: int) -> dict:
    from loramux.engine import Finished, SamplingParams, TokenEvent
    from loramux.pool_requests import PoolRequest

    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(args.requests_per_client):
            prompt = prompt_of(load, window, c, k, args)
            req = PoolRequest(
                messages=[{"role": "user", "content": prompt}],
                mix=load["mixed"][c],
                max_tokens=args.tokens,
                sampling=SamplingParams(temperature=0, logit_bias={int(t): b for t, b in ban.items()}),
            )
            t0 = time.perf_counter()
            ttft, last, itl, n = None, None, [], 0
            for ev in pool.submit(req):
                if isinstance(ev, TokenEvent):
                    now = time.perf_counter()
                    ttft = ttft if ttft is not None else now - t0
                    if last is not None:
                        itl.append(now - last)
                    last = now
                elif isinstance(ev, Finished):
                    n = ev.completion_tokens
            with lock:
                results.append({"ok": True, "ttft": ttft, "itl": itl, "e2e": time.perf_counter() - t0, "tokens": n})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(load["mixed"]))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarise(results, time.perf_counter() - t0)


# --- servers ---------------------------------------------------------------------------------------
def rss_mib(port: int) -> dict[str, float] | None:
    """Peak (VmHWM) and current (VmRSS) resident memory of the process whose command line holds ``--port PORT``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"--port" in cmd and cmd[cmd.index(b"--port") + 1] == str(port).encode():
                fields = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
                return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmHWM", "VmRSS")}
        except (OSError, ValueError, IndexError):
            continue
    return None


def start_servers(stack: ExitStack, n: int, args, base: Path, adapters: list[Path], log_dir: Path) -> dict[str, str]:
    from llama_server import running_llama_server
    from serve_proc import loramux_server

    ours = stack.enter_context(
        loramux_server(
            "--base",
            str(base),
            "--adapters",
            str(adapters[0].parent),
            "--n-seq-max",
            str(n),
            "--n-ctx",
            str(args.n_ctx),
            "--threads",
            str(args.threads),
            "--max-queue",
            str(4 * n + 8),
            log_dir=log_dir,
        )
    )
    stock = stack.enter_context(running_llama_server(base, adapters, n_parallel=n, n_ctx=n * args.n_ctx, threads=args.threads))
    return {"loramux": ours, "stock": stock}


def measure_n(n: int, args, base: Path, adapters: list[Path], ban: dict, log_dir: Path) -> dict:
    load = make_load([a.stem for a in adapters], n, args.seed + n, args.prompt_chars)
    cells: dict[str, list[dict]] = {f"{s} {k}": [] for s in SERVERS for k in LOADS}
    rss = {}
    with ExitStack() as stack:
        urls = start_servers(stack, n, args, base, adapters, log_dir)
        listing = httpx.get(f"{urls['stock']}/lora-adapters").json()
        lora_ids = {Path(a["path"]).stem: a["id"] for a in listing}
        window = 0
        for s in SERVERS:  # warm-up: one short round each
            asyncio.run(run_clients(urls[s], request_bodies(s, load, "mixed", args, ban, lora_ids, window)[:2]))
        for r in range(args.runs):
            for kind in LOADS:
                window += 1  # both servers get the same prompts, unseen by either
                for s in SERVERS:
                    res = asyncio.run(run_clients(urls[s], request_bodies(s, load, kind, args, ban, lora_ids, window)))
                    cells[f"{s} {kind}"].append(res)
                    print(
                        f"  N={n} run {r + 1} {s:7s} {kind:6s} {res['output_tokens_per_s']:7.1f} tok/s "
                        f"ttft p99 {res['ttft_p99_ms']} ms, failed {res['failed']}",
                        flush=True,
                    )
        for s in SERVERS:
            rss[s] = rss_mib(int(urls[s].rsplit(":", 1)[1]))
    from loramux import AdapterPool

    with AdapterPool(base, n_ctx=args.n_ctx, n_seq_max=n, n_threads=args.threads, flash_attn=True) as pool:  # as the server
        pool.load_adapters(adapters)
        engine_run(pool, {**load, "mixed": load["mixed"][:1]}, args, ban, 0)  # warm-up
        cells["engine mixed"] = [engine_run(pool, load, args, ban, 3 * r + 1) for r in range(args.runs)]  # the mixed windows
    return {"cells": {k: median_cell(v) for k, v in cells.items()}, "runs": cells, "rss_mib": rss}


def median_cell(runs: list[dict]) -> dict:
    return {
        k: (statistics.median([r[k] for r in runs if r[k] is not None]) if any(r[k] is not None for r in runs) else None) for k in runs[0]
    }


def print_table(n: int, cells: dict) -> None:
    cols = ("completed", "failed", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms")
    print(f"\nN = {n} clients")
    print(f"{'':16s}" + "".join(f"{c:>21s}" for c in cols))
    for name, cell in cells.items():
        print(f"{name:16s}" + "".join(f"{str(cell[c]):>21s}" for c in cols))
    m, b = cells["loramux mixed"]["output_tokens_per_s"], cells["loramux base"]["output_tokens_per_s"]
    sm, ss = cells["stock mixed"]["output_tokens_per_s"], cells["stock shared"]["output_tokens_per_s"]
    e = cells["engine mixed"]["output_tokens_per_s"]
    print(
        f"ratios: loramux mixed / loramux base {m / b:.2f}; loramux mixed / stock mixed {m / sm:.2f}; "
        f"loramux shared / stock shared {cells['loramux shared']['output_tokens_per_s'] / ss:.2f}; "
        f"HTTP / engine {m / e:.2f}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from loramux import AdapterPool
    from loramux.base_model import default_base_model

    base = default_base_model()
    adapters = convert_adapters(Path(tempfile.gettempdir()) / "loramux-serve-bench", base)
    with AdapterPool(base, n_ctx=64, n_seq_max=1) as pool:
        ban = {str(t): -100 for t in {pool.token_eos(), *pool.tokenize("<|im_end|>")}}
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "adapters": len(adapters), "by_clients": {}}
    with tempfile.TemporaryDirectory() as logs:
        for n in args.clients:
            res = measure_n(n, args, base, adapters, ban, Path(logs))
            out["by_clients"][str(n)] = res
            print_table(n, res["cells"])
            print(f"RSS (MiB, peak VmHWM and current VmRSS): {res['rss_mib']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
