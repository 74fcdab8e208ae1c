"""Serving throughput and latency over loopback: stock and patched llama-server, the loramux hook, loramux serve.

N concurrent streaming clients (``--clients``, default 1 8 32), each with its own BIG-Bench Hard
chat prompt and, in the "mixed" load, its own top-3 mix drawn from the 21 non-embedding fixture
adapters, each sending ``--requests-per-client`` requests of ``--tokens`` greedy tokens
(end-of-generation tokens banned, so every answer has the same length). Loads: mixed (a mix per
client) | shared (one top-3 mix for all) | base (no adapter). Side by side in one run, per N, the
servers of ``--servers`` (default: all), started with the same adapters, threads, N slots and
``--n-ctx`` context per slot:

  stock    upstream llama-server -np N -c N*n_ctx --metrics (tests/llama_server.py); the mix in its
           per-request ``lora`` field (every adapter listed with its scale). Slots with different
           scales never decode in one batch.
  patched  loramux's patched llama-server (``loramux llama-server build``), the same flags plus
           --lora-max-active 4, the same ``lora`` field: requests with different mixes decode in one
           batch, the prompt cache is keyed by mix (no ``cache_prompt: false`` needed)
  hook     ``loramux serve --upstream URL`` in front of a second patched llama-server started as
           above; requests carry loramux's ``"mix": {adapter: weight}`` (none for the base load), the
           hook forwards them as ``lora`` (every adapter; it sees the patched upstream in /props and
           keeps ``cache_prompt``)
  loramux  ``loramux serve --n-seq-max N --n-ctx n_ctx``, the body field ``mix``
  engine   mixed only: the same requests through an AdapterPool in this process (no HTTP), for the
           cost of the HTTP layer (run after the servers are stopped)

Reported per cell, as ``vllm bench serve`` reports them: completed, failed, output tokens/s,
TTFT p50/p99, ITL p50/p99, end-to-end p50 (ms); medians over ``--runs`` rounds (the configurations
interleaved in each round). After each N: the resident memory (peak VmHWM, current VmRSS) of every
server process (for the hook: the patched server behind it and the hook process apart) and the
patched servers' /metrics loramux_* counters (sequences and mixes per decode, fallbacks; warm-up
included). After the tables, the ratios of the medians per N: patched mixed / stock mixed, patched
mixed / stock base (the limit), patched mixed / patched base, patched base / stock base, hook mixed /
patched mixed, TTFT p99 patched mixed / stock mixed, peak RSS patched / stock (and loramux's own).

    .venv/bin/python benchmarks/serve.py --clients 8 32 --runs 3 --json out/serve.json
    .venv/bin/python benchmarks/serve.py --servers stock patched hook --clients 8 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
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
SERVERS = ("stock", "patched", "hook", "loramux", "engine")  # engine: in this process, no HTTP
LOADS = ("mixed", "shared", "base")
STRUCTURED = ("json25", "json100")  # the mixed load with 25% / 100% of the requests under a JSON schema


def answer_schema(tokens: int) -> dict:
    """A JSON schema whose answers cannot end before ``tokens`` tokens (so every answer has the same length)."""
    words = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": tokens}
    return {"type": "object", "properties": {"words": words}, "required": ["words"]}


def constrained(kind: str, c: int) -> bool:
    """Whether client ``c``'s requests carry the schema in load ``kind`` (json25: every fourth client)."""
    pct = int(kind[4:]) if kind in STRUCTURED else 0
    return c * pct % 100 < pct


LORA_MAX_ACTIVE = 4  # the patched server's --lora-max-active (its default): the top-3 mixes fit


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
    ap.add_argument(
        "--servers",
        nargs="+",
        choices=SERVERS,
        default=list(SERVERS),
        help="the servers to measure, side by side (default: all of them)",
    )
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of every server (default: 2)")
    ap.add_argument("--n-ctx", type=int, default=512, help="context per sequence / slot (default: 512)")
    ap.add_argument(
        "--prompt-chars",
        type=int,
        default=200,
        help="cut each BBH prompt to this many characters, so decoding, not prefill, dominates (default: 200)",
    )
    ap.add_argument(
        "--patched-args",
        default="",
        metavar="FLAGS",
        help='more llama-server flags for the patched servers only, e.g. "--cache-ram 0" (default: none)',
    )
    ap.add_argument(
        "--loads",
        nargs="+",
        choices=LOADS + STRUCTURED,
        default=list(LOADS),
        help="loads to run (default: mixed shared base); json25 / json100: the mixed load with 25%% / 100%% of the "
        "requests carrying a JSON schema (response_format json_schema) that the answer must follow",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)
    args.servers = [s for s in SERVERS if s in args.servers]  # one order, each once
    return args


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
        "errors": sorted({r["error"] for r in results if not r["ok"] and r.get("error")})[:3],
    }


# --- HTTP clients ----------------------------------------------------------------------------------
async def stream_one(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, last, itl, chunks, usage = None, None, [], 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"}
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
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    tokens = usage["completion_tokens"] if usage else chunks
    error = None if ttft is not None else f"no content in {chunks} chunks (usage {usage})"
    return {"ok": ttft is not None, "error": error, "ttft": ttft, "itl": itl, "e2e": time.perf_counter() - t0, "tokens": tokens}


async def run_clients(url: str, bodies: list[list[dict]]) -> dict:
    # a new connection per request: a kept-alive connection the server closes just as a client
    # reuses it fails with "Server disconnected without sending a response" (seen on both llama-servers)
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def client_loop(mine: list[dict]) -> list[dict]:
            return [await stream_one(client, b) for b in mine]

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(b) for b in bodies))
        wall = time.perf_counter() - t0
    return summarise([r for rs in per_client for r in rs], wall)


def prompt_of(load: dict, window: int, c: int, k: int, args) -> str:
    n = len(load["mixed"])
    return load["prompts"][((window * n + c) * args.requests_per_client + k) % len(load["prompts"])]


def request_bodies(server: str, load: dict, kind: str, args, ban: dict, lora_ids: dict[str, int] | None, window: int) -> list[list[dict]]:
    n = len(load["mixed"])
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
            mix = load["mixed" if kind in STRUCTURED else kind][c]
            if constrained(kind, c):
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "words", "schema": answer_schema(args.tokens)}}
            if server == "loramux":
                body["mix"] = mix
            elif server == "hook":  # loramux's field; the hook writes llama-server's lora
                if mix:
                    body["mix"] = mix
            else:  # stock, patched: every adapter with an explicit scale (as loramux's hook sends it)
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


def step_counters(url: str) -> tuple[float, float]:
    """loramux serve's (decode steps, sequences summed over them) so far, from its /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in ("loramux_decode_steps_total", "loramux_step_sequences_total"):
            values[name] = float(value)
    return values.get("loramux_decode_steps_total", 0.0), values.get("loramux_step_sequences_total", 0.0)


def sequences_per_decode(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    steps = after[0] - before[0]
    return round((after[1] - before[1]) / steps, 2) if steps else None


def loramux_metrics(url: str) -> dict[str, float] | None:
    """The loramux_* series of a patched llama-server's GET /metrics (counted since it started)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or "loramux_" not in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name.rsplit(":", 1)[-1]] = round(float(value), 3)
        except ValueError:
            continue
    return out or None


def patched_binary() -> Path:
    """loramux's patched llama-server: the last stdout line of ``loramux llama-server build`` (cached after the first build)."""
    proc = subprocess.run([sys.executable, "-m", "loramux", "llama-server", "build"], stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise SystemExit(f"loramux llama-server build failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    return Path(lines[-1])


def start_servers(
    stack: ExitStack, n: int, args, base: Path, adapters: list[Path], log_dir: Path, patched: Path | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Start the HTTP servers of ``args.servers`` for N clients. Returns the URL each server's
    requests go to, and the URL of every server process (for its RSS): for the hook, the patched
    llama-server behind it ("hook upstream") and the hook itself ("hook process")."""
    from llama_server import running_llama_server
    from serve_proc import loramux_server

    def llama_server(binary: Path | None, extra: list[str]) -> str:  # the same slots, context per slot and threads for each
        return stack.enter_context(
            running_llama_server(
                base, adapters, n_parallel=n, n_ctx=n * args.n_ctx, threads=args.threads, extra_args=["--metrics", *extra], binary=binary
            )
        )

    patched_flags = ["--lora-max-active", str(LORA_MAX_ACTIVE), *args.patched_args.split()]
    urls: dict[str, str] = {}
    procs: dict[str, str] = {}
    if "stock" in args.servers:
        urls["stock"] = procs["stock"] = llama_server(None, [])
    if "patched" in args.servers:
        urls["patched"] = procs["patched"] = llama_server(patched, patched_flags)
    if "hook" in args.servers:
        procs["hook upstream"] = upstream = llama_server(patched, patched_flags)
        urls["hook"] = procs["hook process"] = stack.enter_context(
            loramux_server("--upstream", upstream, "--base", str(base), log_dir=log_dir)
        )
    if "loramux" in args.servers:
        urls["loramux"] = procs["loramux"] = stack.enter_context(
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
    return urls, procs


def measure_n(n: int, args, base: Path, adapters: list[Path], ban: dict, log_dir: Path, patched: Path | None) -> dict:
    load = make_load([a.stem for a in adapters], n, args.seed + n, args.prompt_chars)
    http = [s for s in args.servers if s != "engine"]
    runs: dict[str, list[dict]] = {f"{s} {k}": [] for s in http for k in args.loads}
    rss, metrics = {}, {}
    with ExitStack() as stack:
        urls, procs = start_servers(stack, n, args, base, adapters, log_dir, patched)
        lora_ids = {
            s: {Path(a["path"]).stem: a["id"] for a in httpx.get(f"{urls[s]}/lora-adapters").json()}
            for s in ("stock", "patched")
            if s in urls
        }
        window = 0
        for s in http:  # warm-up: one short round each
            asyncio.run(run_clients(urls[s], request_bodies(s, load, "mixed", args, ban, lora_ids.get(s), window)[:2]))
        for r in range(args.runs):
            for kind in args.loads:
                window += 1  # every server gets the same prompts, unseen by any
                for s in http:
                    before = step_counters(urls[s]) if s == "loramux" else None
                    res = asyncio.run(run_clients(urls[s], request_bodies(s, load, kind, args, ban, lora_ids.get(s), window)))
                    if before is not None:
                        res["sequences_per_decode"] = sequences_per_decode(before, step_counters(urls[s]))
                    runs[f"{s} {kind}"].append(res)
                    print(
                        f"  N={n} run {r + 1} {s:7s} {kind:6s} {res['output_tokens_per_s']:7.1f} tok/s "
                        f"ttft p99 {res['ttft_p99_ms']} ms, failed {res['failed']}",
                        flush=True,
                    )
        for label, url in procs.items():
            rss[label] = rss_mib(int(url.rsplit(":", 1)[1]))
            if label in ("patched", "hook upstream"):
                metrics[label] = loramux_metrics(url)
    if "engine" in args.servers:
        from loramux import AdapterPool

        with AdapterPool(base, n_ctx=args.n_ctx, n_seq_max=n, n_threads=args.threads, flash_attn=True) as pool:  # as the server
            pool.load_adapters(adapters)
            engine_run(pool, {**load, "mixed": load["mixed"][:1]}, args, ban, 0)  # warm-up
            runs["engine mixed"] = [engine_run(pool, load, args, ban, 3 * r + 1) for r in range(args.runs)]  # the mixed windows
    order = [f"{s} {k}" for k in args.loads + ["mixed"] for s in args.servers if f"{s} {k}" in runs]  # by load, side by side
    order = list(dict.fromkeys(order))
    cells = {key: median_cell(runs[key]) for key in order}
    return {"cells": cells, "runs": runs, "rss_mib": rss, "loramux_metrics": metrics, "ratios": ratios(cells, rss)}


def ratios(cells: dict, rss: dict) -> dict[str, float | None]:
    """The ratios of the medians (None where a server was not measured)."""

    def tps(key: str) -> float | None:
        return (cells.get(key) or {}).get("output_tokens_per_s")

    def ttft99(key: str) -> float | None:
        return (cells.get(key) or {}).get("ttft_p99_ms")

    def peak(label: str) -> float | None:
        return (rss.get(label) or {}).get("VmHWM")

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    return {
        "tok/s patched mixed / stock mixed": div(tps("patched mixed"), tps("stock mixed")),
        "tok/s patched mixed / stock base (the limit)": div(tps("patched mixed"), tps("stock base")),
        "tok/s patched mixed / patched base": div(tps("patched mixed"), tps("patched base")),
        "tok/s patched base / stock base": div(tps("patched base"), tps("stock base")),
        "tok/s hook mixed / patched mixed": div(tps("hook mixed"), tps("patched mixed")),
        "TTFT p99 patched mixed / stock mixed": div(ttft99("patched mixed"), ttft99("stock mixed")),
        "peak RSS patched / stock": div(peak("patched"), peak("stock")),
        "tok/s loramux mixed / stock mixed": div(tps("loramux mixed"), tps("stock mixed")),
        "tok/s loramux mixed / patched mixed": div(tps("loramux mixed"), tps("patched mixed")),
        "tok/s loramux mixed / loramux base": div(tps("loramux mixed"), tps("loramux base")),
        "tok/s loramux mixed / engine mixed (HTTP cost)": div(tps("loramux mixed"), tps("engine mixed")),
        "peak RSS loramux / stock": div(peak("loramux"), peak("stock")),
        **{
            f"tok/s {s} {k} / {s} mixed (a JSON schema on {k[4:]}% of requests)": div(tps(f"{s} {k}"), tps(f"{s} mixed"))
            for s in ("loramux", "patched")
            for k in STRUCTURED
            if f"{s} {k}" in cells
        },
        **{
            f"sequences per decode loramux {k}": (cells.get(f"loramux {k}") or {}).get("sequences_per_decode")
            for k in ("mixed",) + STRUCTURED
            if f"loramux {k}" in cells
        },
    }


def median_cell(runs: list[dict]) -> dict:
    cell = {
        k: (statistics.median([r[k] for r in runs if r[k] is not None]) if any(r[k] is not None for r in runs) else None)
        for k in runs[0]
        if k != "errors"
    }
    cell["errors"] = sorted({e for r in runs for e in r.get("errors", [])})  # what failed, in any round
    return cell


COLUMNS = (
    ("completed", "completed"),
    ("failed", "failed"),
    ("output_tokens_per_s", "out tok/s"),
    ("ttft_p50_ms", "TTFT p50"),
    ("ttft_p99_ms", "TTFT p99"),
    ("itl_p50_ms", "ITL p50"),
    ("itl_p99_ms", "ITL p99"),
    ("e2e_p50_ms", "e2e p50"),
)


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


def print_table(n: int, res: dict, runs: int) -> None:
    print(f"\nN = {n} clients (medians of {runs} round{'s' if runs != 1 else ''}; times in ms)")
    print(f"{'':16s}" + "".join(f"{h:>11s}" for _, h in COLUMNS))
    for name, cell in res["cells"].items():
        print(f"{name:16s}" + "".join(f"{fmt(cell[c]):>11s}" for c, _ in COLUMNS))
    print(
        "peak / current RSS (MiB): "
        + "; ".join(f"{k} {fmt((v or {}).get('VmHWM'))} / {fmt((v or {}).get('VmRSS'))}" for k, v in res["rss_mib"].items())
    )
    for label, m in res["loramux_metrics"].items():
        if m:
            print(
                f"{label} /metrics (warm-up included): sequences per decode {fmt(m.get('loramux_decode_sequences_per_decode'))} "
                f"(max {fmt(m.get('loramux_decode_sequences_max'))}), mixes per decode {fmt(m.get('loramux_decode_mixes_per_decode'))} "
                f"(max {fmt(m.get('loramux_decode_mixes_max'))}), fallback requests {fmt(m.get('loramux_fallback_requests_total'))}"
            )


def print_ratios(by_clients: dict) -> None:
    ns = list(by_clients)
    names = [k for k in next(iter(by_clients.values()))["ratios"] if any(by_clients[n]["ratios"][k] is not None for n in ns)]
    if not names:
        return
    print("\nRatios of the medians")
    print(f"{'':48s}" + "".join(f"{'N=' + n:>9s}" for n in ns))
    for k in names:
        print(f"{k:48s}" + "".join(f"{fmt(by_clients[n]['ratios'][k]):>9s}" for n in ns))


def main(argv=None) -> int:
    args = parse_args(argv)
    from loramux import AdapterPool
    from loramux.base_model import default_base_model

    base = default_base_model()
    adapters = convert_adapters(Path(tempfile.gettempdir()) / "loramux-serve-bench", base)
    patched = patched_binary() if {"patched", "hook"} & set(args.servers) else None
    with AdapterPool(base, n_ctx=64, n_seq_max=1) as pool:
        ban = {str(t): -100 for t in {pool.token_eos(), *pool.tokenize("<|im_end|>")}}
    out = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "adapters": len(adapters),
        "patched_binary": None if patched is None else str(patched),
        "by_clients": {},
        "ratios": {},
    }
    with tempfile.TemporaryDirectory() as logs:
        for n in args.clients:
            res = measure_n(n, args, base, adapters, ban, Path(logs), patched)
            out["by_clients"][str(n)] = res
            out["ratios"][str(n)] = res["ratios"]
            print_table(n, res, args.runs)
    print_ratios(out["by_clients"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
