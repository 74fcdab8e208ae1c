"""loramux on Ray Serve: adapter-set affinity vs no affinity vs one process, on a multi-tenant load.

The load: ``--tenants`` tenants, each with its own adapter set (1-3 of the 21 non-embedding fixture
adapters, fixed weights) and its own shared system prompt; each request picks its tenant from a Zipf
law (``--zipf`` exponent) and asks one short BIG-Bench Hard question (``--tokens`` greedy tokens,
end-of-generation banned). Requests arrive as a Poisson process (``--rate`` per second,
``--requests`` in all); the same requests in the same order for every configuration:

  affinity  ``loramux serve --ray``: an ingress and ``--replicas`` engine replicas of ``--threads``
            threads; the ingress routes by the adapter-set key (Serve multiplexing), each replica
            keeps ``--max-adapter-sets`` keys loaded (LRU)
  none      the same application with ``--affinity none``: the same keys and LRU in the replicas, but
            Serve's default routing (the less busy of two random replicas)
  single    one ``loramux serve`` process of ``--single-threads`` threads (default: one replica's), every
            adapter loaded at start

Reported per configuration: requests/s, TTFT and end-to-end p50/p99 (ms), failures; for the Ray
configurations the ingress's affinity hit rate, adapter loads per 1,000 requests, and prompt tokens
reused from the prefix cache (summed over the replicas' /metrics); for single the prefix reuse.
Then the ingress's own overhead: the ingress in front of a no-op engine deployment (answers at once,
no model), latency p50/p99 at one client and requests/s at ``--overhead-clients``. Last, a projection
to N machines from the measured single-replica costs (see BENCHMARKS.md for what it assumes).

This machine has 2 cores: replicas share them, so no configuration can show compute scaling. What is
measured is affinity against no affinity at equal replicas: adapter loads, prefix-cache hits, tail latency.

    .venv/bin/python benchmarks/ray_serve.py --json out/ray_serve.json
    .venv/bin/python benchmarks/ray_serve.py --requests 60 --rate 2 --configs affinity none
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIGS = ("affinity", "none", "single")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="configurations (default: all)")
    ap.add_argument("--tenants", type=int, default=12, help="tenants, each with its own adapter set and system prompt (default: 12)")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the tenants' popularity (default: 1.1)")
    ap.add_argument("--requests", type=int, default=80, help="requests per configuration (default: 80)")
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second (default: 2)")
    ap.add_argument("--tokens", type=int, default=12, help="greedy tokens per answer (default: 12)")
    ap.add_argument("--replicas", type=int, default=2, help="engine replicas (default: 2)")
    ap.add_argument("--threads", type=int, default=1, help="threads per replica (default: 1)")
    ap.add_argument("--single-threads", type=int, default=None, help="threads of the single process (default: --threads, one replica's)")
    ap.add_argument("--max-adapter-sets", type=int, default=3, help="keys each replica keeps loaded (default: 3)")
    ap.add_argument("--overhead-clients", type=int, default=16, help="concurrent clients of the no-op engine run (default: 16)")
    ap.add_argument("--overhead-requests", type=int, default=300, help="requests of the no-op engine run (default: 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write every figure here")
    return ap.parse_args(argv)


# --- the load --------------------------------------------------------------------------------------
def make_load(names: list[str], args) -> list[dict]:
    """The requests, in arrival order: ``{"at": seconds, "tenant", "mix", "system", "question"}``."""
    from serve import DEV

    rng = random.Random(args.seed)
    tenants = []
    for t in range(args.tenants):
        picked = rng.sample(names, rng.choice((1, 2, 3)))
        w = [round(rng.random() + 0.2, 2) for _ in picked]
        system = f"You are the assistant of tenant {t}. " + " ".join(rng.sample(names, 6)).replace("_", " ") + ". Answer briefly."
        tenants.append({"mix": dict(zip(picked, w)), "system": system})
    popularity = [1 / (k + 1) ** args.zipf for k in range(args.tenants)]
    questions = [json.loads(line)["input"][:160] for line in DEV.open()]
    rng.shuffle(questions)
    at, out = 0.0, []
    for i in range(args.requests):
        at += rng.expovariate(args.rate)
        t = rng.choices(range(args.tenants), weights=popularity)[0]
        out.append({"at": at, "tenant": t, "mix": tenants[t]["mix"], "system": tenants[t]["system"], "question": questions[i]})
    return out


def body_of(req: dict, args, ban: dict) -> dict:
    messages = [{"role": "system", "content": req["system"]}, {"role": "user", "content": req["question"]}]
    return {"messages": messages, "mix": req["mix"], "max_tokens": args.tokens, "temperature": 0, "logit_bias": ban}


async def run_load(url: str, load: list[dict], args, ban: dict) -> dict:
    """Send the load open-loop (each request at its arrival time); the summary of what came back."""
    from serve import stream_one, summarise

    limits = httpx.Limits(max_connections=len(load) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(req: dict) -> dict:
            await asyncio.sleep(max(0.0, req["at"] - (time.perf_counter() - t0)))
            body = body_of(req, args, ban) | {"stream": True, "stream_options": {"include_usage": True}}
            return await stream_one(client, body)

        results = await asyncio.gather(*(one(r) for r in load))
        wall = time.perf_counter() - t0
    out = summarise(list(results), wall)
    ok = [r for r in results if r["ok"]]
    out["requests_per_s"] = round(len(ok) / wall, 2)
    out["e2e_p99_ms"] = round(1000 * sorted(r["e2e"] for r in ok)[max(0, int(round(0.99 * (len(ok) - 1))))], 1) if ok else None
    return out


# --- metrics -----------------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """Every ``loramux_*`` sample of /metrics summed over its labels but ``result`` (kept in the name)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = re.match(r"^(loramux_\w+)(\{[^}]*\})? (\S+)$", line)
        if not m:
            continue
        result = re.search(r'result="(\w+)"', m.group(2) or "")
        name = m.group(1) + (f":{result.group(1)}" if result else "")
        out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


def engine_figures(before: dict, after: dict, n: int) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    hits, misses = d.get("loramux_ray_affinity_requests_total:hit", 0), d.get("loramux_ray_affinity_requests_total:miss", 0)
    prompt = d.get("loramux_prompt_tokens_total", 0)
    return {
        "affinity_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
        "adapter_loads_per_1000": round(1000 * d.get("loramux_ray_adapter_loads_total", 0) / n, 1),
        "adapter_loads": int(d.get("loramux_ray_adapter_loads_total", 0)),
        "prefix_tokens_reused": int(d.get("loramux_prefix_cache_hit_tokens_total", 0)),
        "prefix_reused_share": round(d.get("loramux_prefix_cache_hit_tokens_total", 0) / prompt, 3) if prompt else None,
        "engine_s_per_request": round(d.get("loramux_decode_seconds_total", 0) / n, 4),
    }


# --- configurations ----------------------------------------------------------------------------------
def run_single(args, base: Path, adapter_dir: Path, load: list[dict], ban: dict, log_dir: Path) -> dict:
    from serve_proc import loramux_server_process

    threads = str(args.single_threads or args.threads)
    flags = ("--base", str(base), "--adapters", str(adapter_dir), "--threads", threads, "--n-seq-max", "8", "--n-ctx", "512")
    with loramux_server_process(*flags, log_dir=log_dir) as server:
        before = scrape(server.url)
        out = asyncio.run(run_load(server.url, load, args, ban))
        time.sleep(0.3)
        return out | engine_figures(before, scrape(server.url), len(load))


def run_ray(affinity: str, args, base: Path, adapter_dir: Path, load: list[dict], ban: dict, url: str) -> dict:
    from ray import serve

    from loramux.ray.app import APP_NAME, RayOptions, build_app
    from loramux.server.settings import ServeSettings

    settings = ServeSettings(
        base=base, adapters=[adapter_dir], threads=args.threads, n_seq_max=8, n_ctx=512, ray=True, replicas=args.replicas
    ).check()
    options = RayOptions(replicas=args.replicas, max_sets=args.max_adapter_sets, affinity=affinity, engine_cpus=0.5, ingress_cpus=0.25)
    serve.run(build_app(settings, options), name=APP_NAME, route_prefix="/")
    try:
        time.sleep(1.5)  # the replicas' first metrics reach the board
        before = scrape(url)
        out = asyncio.run(run_load(url, load, args, ban))
        time.sleep(1.5)
        return out | engine_figures(before, scrape(url), len(load))
    finally:
        serve.delete(APP_NAME)


# --- the ingress's own overhead ------------------------------------------------------------------------
class NoopEngine:
    """An engine deployment that answers every request at once, without a model (the ingress's cost alone)."""

    async def forward(self, req, key: str, adapters: tuple[str, ...]):
        yield {"status": 200, "headers": {"content-type": "application/json"}, "replica": "noop", "hit": True}
        yield b'{"choices": []}'


def adapter_load_s(base: Path, adapter: Path, times: int = 3) -> float:
    """Seconds to load (and unload) one converted adapter into a pool: the price of a miss."""
    from loramux import AdapterPool

    with AdapterPool(base, n_ctx=256, n_seq_max=1, n_threads=1) as pool:
        took = []
        for _ in range(times):
            t0 = time.perf_counter()
            pool.load(adapter)
            took.append(time.perf_counter() - t0)
            pool.unload(adapter.stem)
    return statistics.median(took)


def overhead(args, base: Path, adapter_dir: Path, url: str) -> dict:
    """Latency at one client and requests/s at ``--overhead-clients`` through the ingress to a no-op engine."""
    from ray import serve

    from loramux.ray.app import APP_NAME
    from loramux.ray.ingress import Ingress
    from loramux.server.settings import ServeSettings

    settings = ServeSettings(base=base, adapters=[adapter_dir]).check()
    names = sorted(p.stem for p in adapter_dir.iterdir())
    noop = serve.deployment(NoopEngine, name="NoopEngine", ray_actor_options={"num_cpus": 0.25}).bind()
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="LoramuxIngress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000
    )
    serve.run(ingress.bind(settings, names, noop, None, "set"), name=APP_NAME, route_prefix="/")
    body = {"prompt": "hello", "mix": {names[0]: 0.5, names[1]: 0.5}, "max_tokens": 1}
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            alone = []
            for _ in range(60):
                t0 = time.perf_counter()
                assert client.post("/v1/completions", json=body).status_code == 200
                alone.append(1000 * (time.perf_counter() - t0))
        done, lock = [0], threading.Lock()

        def hammer(n: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                for _ in range(n):
                    ok = c.post("/v1/completions", json=body).status_code == 200
                    with lock:
                        done[0] += ok

        per = max(1, args.overhead_requests // args.overhead_clients)
        threads = [threading.Thread(target=hammer, args=(per,)) for _ in range(args.overhead_clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wall = time.perf_counter() - t0
    finally:
        serve.delete(APP_NAME)
    alone.sort()
    return {
        "p50_ms_one_client": round(alone[len(alone) // 2], 2),
        "p99_ms_one_client": round(alone[int(0.99 * (len(alone) - 1))], 2),
        "requests_per_s": round(done[0] / wall, 1),
        "clients": args.overhead_clients,
        "adapter_load_s": round(adapter_load_s(base, next(adapter_dir.iterdir())), 4),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from serve import convert_adapters

    from loramux.base_model import default_base_model

    from serve_proc import free_port

    base = default_base_model()
    work = Path(tempfile.mkdtemp(prefix="loramux-ray-bench-"))
    adapters = convert_adapters(work / "adapters", base)
    names = [p.stem for p in adapters]
    load = make_load(names, args)
    ban = {"2": -100}  # <|im_end|>: every answer has --tokens tokens
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "tenants_seen": len({r["tenant"] for r in load})}
    if "single" in args.configs:
        results["single"] = run_single(args, base, work / "adapters", load, ban, work)
        print("single", results["single"], flush=True)
    ray_configs = [c for c in ("affinity", "none") if c in args.configs]
    if ray_configs:
        import ray
        from ray import serve

        port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            for config in ray_configs:
                results[config] = run_ray("set" if config == "affinity" else "none", args, base, work / "adapters", load, ban, url)
                print(config, results[config], flush=True)
            results["ingress_overhead"] = overhead(args, base, work / "adapters", url)
            print("ingress overhead", results["ingress_overhead"], flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    results["projection"] = projection(results, args)
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def projection(results: dict, args) -> dict | None:
    """Requests/s on N machines of one replica each, from a configuration's own measured costs: each
    request takes its engine-seconds (decode time summed over the replicas, divided by the requests)
    plus its share of adapter loads at the measured load price; N replicas serve N / that, up to one
    ingress replica's no-op requests/s."""
    over = results.get("ingress_overhead")
    if not over:
        return None
    out = {}
    for config in ("affinity", "none"):
        if config not in results or not results[config].get("engine_s_per_request"):
            continue
        cost = results[config]["engine_s_per_request"] + results[config]["adapter_loads_per_1000"] / 1000 * over["adapter_load_s"]
        out[config] = {n: round(min(n / cost, over["requests_per_s"]), 1) for n in (1, 2, 4, 8, 16, 64)}
    return out


def report(results: dict) -> None:
    keys = ("requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "failed")
    more = ("affinity_hit_rate", "adapter_loads_per_1000", "prefix_reused_share", "prefix_tokens_reused")
    print(f"\n{'config':10}" + "".join(f"{k:>24}" for k in keys + more))
    for config in CONFIGS:
        if config in results:
            print(f"{config:10}" + "".join(f"{str(results[config].get(k)):>24}" for k in keys + more))
    if results.get("ingress_overhead"):
        print("\ningress overhead (no-op engine):", results["ingress_overhead"])
    if results.get("projection"):
        print("projection, requests/s on N machines:", results["projection"])


if __name__ == "__main__":
    sys.exit(main())
