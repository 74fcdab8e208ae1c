"""Soak test of ``loramux serve``: many concurrent clients, mixed mixes, streams and cancels, checked.

Starts a real ``loramux serve`` on loopback with five PEFT fixture adapters (converted on the
fly) and a named mix, then runs ``--clients`` concurrent clients, each sending
``--requests`` greedy ``/v1/completions`` requests in turn (``--max-seconds`` bounds the run:
no request starts after it). Each request takes one of a fixed set of distinct combos
(``--prompts`` BIG-Bench Hard dev prompts x six mix selectors: the base model, an adapter as
``model``, a body ``mix`` of two adapters, one of three with a negative weight, the named mix,
llama-server's ``lora`` field), is streamed or not, and some streams are cancelled on purpose
(the client closes the stream after the first chunk).

Checks (exit status 1 if one fails):

- no 5xx, no transport error, no error event in a stream;
- nothing lost or duplicated: every request id (sent as ``X-Request-Id`` and ``user``, echoed
  back by the server) has exactly one outcome, a complete answer (finish reason, ``[DONE]``) or
  a recorded deliberate cancel; on the server, the engine's submitted count grew by exactly the
  number of requests sent and its finished + cancelled counts by the same number;
- every complete answer equals the same request sent alone (token oracle: each combo is first
  run alone, with no other request in flight, asking for its top-2 log-probabilities; a
  concurrent answer must match token by token, except that it may part from the alone answer at
  a step whose alone top-2 gap is at most GAP_FLOOR, where batching may flip the argmax, as in
  tests/test_serve.py). End-of-generation tokens are banned, so every answer has max_tokens tokens;
- the server's resident memory (after a warm-up round, and at the end) grew by at most
  ``--rss-bound-mib``.

Reports requests, outcomes, errors, end-to-end p50/p99, TTFT p50/p99 of streams, throughput
and RSS; ``--json OUT`` writes them all.

    .venv/bin/python benchmarks/soak.py --clients 64 --requests 200 --max-seconds 540 --json out/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
DEV = ROOT.parent / "shared" / "data" / "bbh" / "dev.jsonl"
ADAPTERS = ("boolean_expressions", "navigate", "hyperbaton", "snarks", "sports_understanding")
NAMED_MIX = "soakmix"
GAP_FLOOR = 2.0  # tests/conftest.py's GAP_FLOOR: below it the batch floor can flip an argmax
BAN_EOG = {"0": -100, "2": -100}  # SmolLM2's <|endoftext|> and <|im_end|>: every answer runs max_tokens


@dataclass
class SoakOptions:
    """The size and shape of one soak run."""

    clients: int = 64
    requests: int = 200
    max_seconds: float = 540.0
    max_tokens: int = 8
    stream_frac: float = 0.5
    cancel_frac: float = 0.2  # of the streamed requests
    prompts: int = 6
    prompt_chars: int = 160
    seed: int = 0
    rss_bound_mib: float = 50.0
    named_mix: str | None = NAMED_MIX


@dataclass(frozen=True)
class Combo:
    """One distinct request: a prompt and how it selects its mix."""

    key: str
    prompt: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Planned:
    rid: str
    combo: int
    stream: bool
    cancel: bool


@dataclass
class Alone:
    """A combo's answer with nothing else in flight, and its top-2 gap at every step."""

    tokens: list[str]
    text: str
    gaps: list[float]


@dataclass
class Outcome:
    """What one request got back."""

    rid: str
    combo: int
    stream: bool
    kind: str = "error"  # "complete" | "cancelled" | "error"
    status: int | None = None
    tokens: list[str] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    latency: float | None = None
    ttft: float | None = None
    echoed: bool = False
    error: str | None = None
    verdict: str | None = None  # "exact" | "tolerated" | "mismatch" (complete answers)


# --- the load ------------------------------------------------------------------------------------
def load_prompts(n: int, chars: int, seed: int) -> list[str]:
    """``n`` dev prompts from distinct BBH tasks, cut to ``chars`` characters."""
    by_task: dict[str, str] = {}
    with DEV.open() as f:
        for line in f:
            row = json.loads(line)
            by_task.setdefault(row["task"], row["input"][:chars])
    tasks = sorted(by_task)
    random.Random(seed).shuffle(tasks)
    return [by_task[t] for t in tasks[:n]]


def selectors(adapters: list[str], lora_ids: dict[str, int], named: str | None) -> dict[str, dict[str, Any]]:
    """Six ways of choosing a mix (five without a named mix), over the first five adapters."""
    a = adapters
    out: dict[str, dict[str, Any]] = {
        "base": {},
        "adapter": {"model": a[0]},
        "mix2": {"mix": {a[1]: 0.6, a[2]: 0.4}},
        "mix3neg": {"mix": {a[3]: 1.0, a[1]: -0.3, a[4]: 0.5}},
        "lora": {"lora": [{"id": lora_ids[a[4]], "scale": 0.7}, {"id": lora_ids[a[0]], "scale": 0.3}]},
    }
    if named is not None:
        out["named"] = {"model": named}
    return out


def make_combos(prompts: list[str], sel: dict[str, dict[str, Any]]) -> list[Combo]:
    return [Combo(f"p{i}/{name}", p, fields) for i, p in enumerate(prompts) for name, fields in sel.items()]


def make_plan(opts: SoakOptions, n_combos: int) -> list[list[Planned]]:
    """Per client, its requests in order: a combo, streamed or not, cancelled or not (seeded)."""
    rng = random.Random(opts.seed)
    plan = []
    for c in range(opts.clients):
        mine = []
        for k in range(opts.requests):
            stream = rng.random() < opts.stream_frac
            cancel = stream and rng.random() < opts.cancel_frac
            mine.append(Planned(f"soak-{opts.seed}-{c}-{k}", rng.randrange(n_combos), stream, cancel))
        plan.append(mine)
    return plan


def body_of(combo: Combo, max_tokens: int, *, stream: bool, rid: str, logprobs: int) -> dict[str, Any]:
    return {
        "prompt": combo.prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": logprobs,
        "logit_bias": BAN_EOG,
        "user": rid,
        "stream": stream,
        **combo.fields,
    }


# --- the oracle -------------------------------------------------------------------------------------
def run_alone(url: str, combos: list[Combo], max_tokens: int) -> list[Alone]:
    """Every combo sent alone, one after another, with its top-2 log-probabilities."""
    out = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for i, combo in enumerate(combos):
            r = client.post("/v1/completions", json=body_of(combo, max_tokens, stream=False, rid=f"alone-{i}", logprobs=2))
            if r.status_code != 200:
                raise RuntimeError(f"alone run of {combo.key} answered {r.status_code}: {r.text[:500]}")
            choice = r.json()["choices"][0]
            lp = choice["logprobs"]
            gaps = [_gap(top) for top in lp["top_logprobs"]]
            out.append(Alone(list(lp["tokens"]), choice["text"], gaps))
    return out


def _gap(top: dict[str, float] | None) -> float:
    values = sorted((top or {}).values())
    return values[-1] - values[-2] if len(values) > 1 else float("inf")


def verdict(out: Outcome, alone: Alone) -> str:
    """``exact``, ``tolerated`` (parted at a step with a top-2 gap <= GAP_FLOOR) or ``mismatch``."""
    for t, (got, want) in enumerate(zip(out.tokens, alone.tokens)):
        if got != want:
            return "tolerated" if alone.gaps[t] <= GAP_FLOOR else "mismatch"
    if len(out.tokens) != len(alone.tokens):
        return "mismatch"
    return "exact" if out.text == alone.text else "mismatch"


# --- clients ------------------------------------------------------------------------------------------
async def send_whole(client: httpx.AsyncClient, body: dict, out: Outcome) -> None:
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json=body, headers={"X-Request-Id": out.rid})
    out.latency, out.status = time.perf_counter() - t0, r.status_code
    out.echoed = r.headers.get("x-request-id") == out.rid
    if r.status_code != 200:
        out.error = r.text[:300]
        return
    choice = r.json()["choices"][0]
    out.tokens = list((choice.get("logprobs") or {}).get("tokens") or [])
    out.text, out.finish = choice["text"], choice["finish_reason"]
    out.kind = "complete" if out.finish else "error"


async def send_stream(client: httpx.AsyncClient, body: dict, out: Outcome, cancel: bool) -> None:
    t0 = time.perf_counter()
    done, parts = False, []
    async with client.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": out.rid}) as r:
        out.status, out.echoed = r.status_code, r.headers.get("x-request-id") == out.rid
        if r.status_code != 200:
            out.error = (await r.aread()).decode(errors="replace")[:300]
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.error = json.dumps(chunk["error"])[:300]
                return
            choice = (chunk.get("choices") or [{}])[0]
            got = (choice.get("logprobs") or {}).get("tokens") or []
            if got and out.ttft is None:
                out.ttft = time.perf_counter() - t0
            out.tokens += got
            parts.append(choice.get("text") or "")
            out.finish = choice.get("finish_reason") or out.finish
            if cancel and got:
                out.kind = "cancelled"  # leaving the block closes the stream: the server cancels
                return
    out.latency, out.text = time.perf_counter() - t0, "".join(parts)
    out.kind = "complete" if done and out.finish else "error"


async def one_request(client: httpx.AsyncClient, p: Planned, combos: list[Combo], max_tokens: int) -> Outcome:
    out = Outcome(p.rid, p.combo, p.stream)
    body = body_of(combos[p.combo], max_tokens, stream=p.stream, rid=p.rid, logprobs=0)
    try:
        if p.stream:
            await send_stream(client, body, out, p.cancel)
        else:
            await send_whole(client, body, out)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as exc:
        out.kind, out.error = "error", f"{type(exc).__name__}: {exc}"
    return out


async def run_clients(
    url: str, plan: list[list[Planned]], combos: list[Combo], max_tokens: int, deadline: float
) -> tuple[list[Outcome], float]:
    """Every client sends its planned requests in turn until the plan or the deadline ends."""
    limits = httpx.Limits(max_connections=len(plan) + 8, max_keepalive_connections=len(plan) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def client_loop(mine: list[Planned]) -> list[Outcome]:
            got = []
            for p in mine:
                if time.monotonic() >= deadline:
                    break
                got.append(await one_request(client, p, combos, max_tokens))
            return got

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(m) for m in plan))
    return [o for outs in per_client for o in outs], time.perf_counter() - t0


# --- the server's side ------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """The engine's counters and the HTTP responses by status class (``http_5xx`` ...) from /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("loramux_http_responses_total{"):
            status = line.split('status="', 1)[1][0]
            out[f"http_{status}xx"] = out.get(f"http_{status}xx", 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("loramux_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(url: str, timeout: float = 120.0) -> dict[str, float]:
    """/metrics once nothing runs or waits (cancelled streams are reaped at the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if (m["loramux_requests_running"] == 0 and m["loramux_requests_waiting"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (psutil if installed, else /proc/PID/status)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


class RssSampler:
    """RSS of a process every ``every`` seconds in a background thread."""

    def __init__(self, pid: int, every: float = 2.0) -> None:
        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.every):
            self.samples.append((round(time.monotonic() - t0, 1), round(rss_mib(self.pid), 1)))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the report ------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def summarise(outcomes: list[Outcome], wall: float, planned: int) -> dict[str, Any]:
    done = [o for o in outcomes if o.kind == "complete"]
    streams = [o for o in outcomes if o.stream and o.ttft is not None]
    lat = [o.latency for o in done if o.latency is not None]
    ttft = [o.ttft for o in streams]
    return {
        "planned": planned,
        "sent": len(outcomes),
        "complete": len(done),
        "cancelled": sum(o.kind == "cancelled" for o in outcomes),
        "errors": sum(o.kind == "error" for o in outcomes),
        "streamed": sum(o.stream for o in outcomes),
        "status_5xx": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        "status_4xx": sum(1 for o in outcomes if o.status is not None and 400 <= o.status < 500),
        "oracle": {v: sum(o.verdict == v for o in done) for v in ("exact", "tolerated", "mismatch")},
        "latency_p50_ms": ms(percentile(lat, 50)),
        "latency_p99_ms": ms(percentile(lat, 99)),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(done) / wall, 2) if wall else None,
        "tokens_per_s": round(sum(len(o.tokens) for o in outcomes) / wall, 1) if wall else None,
    }


def run_checks(outcomes: list[Outcome], m0: dict, m1: dict, rss: tuple[float, float], opts: SoakOptions) -> dict[str, Any]:
    """Each check: ``{"ok": bool, ...}`` with what it saw."""
    delta = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in set(m0) | set(m1)}
    reached = sum(1 for o in outcomes if o.status == 200)
    ids = [o.rid for o in outcomes]
    ended = delta["loramux_requests_finished_total"] + delta["loramux_requests_cancelled_total"]
    bad = [o for o in outcomes if o.kind == "error"][:5]
    return {
        "no_5xx": {
            "ok": not any((o.status or 0) >= 500 for o in outcomes) and delta.get("http_5xx", 0) == 0,
            "server_5xx": delta.get("http_5xx", 0),
        },
        "no_errors": {"ok": not bad, "first": [asdict(o) for o in bad]},
        "none_lost_or_duplicated": {
            "ok": len(ids) == len(set(ids))
            and all(o.echoed for o in outcomes if o.status is not None)
            and delta["loramux_requests_submitted_total"] == reached
            and ended == reached,
            "sent": len(ids),
            "distinct_ids": len(set(ids)),
            "reached_engine": reached,
            "engine_submitted": delta["loramux_requests_submitted_total"],
            "engine_finished_or_cancelled": ended,
            "ids_echoed": sum(o.echoed for o in outcomes),
        },
        "oracle": {
            "ok": not any(o.verdict == "mismatch" for o in outcomes),
            "mismatches": [o.rid for o in outcomes if o.verdict == "mismatch"][:10],
        },
        "rss_flat": {
            "ok": rss[1] - rss[0] <= opts.rss_bound_mib,
            "before_mib": round(rss[0], 1),
            "after_mib": round(rss[1], 1),
            "growth_mib": round(rss[1] - rss[0], 1),
            "bound_mib": opts.rss_bound_mib,
        },
    }


# --- one run ---------------------------------------------------------------------------------------
def soak(url: str, pid: int, opts: SoakOptions, log=print) -> dict[str, Any]:
    """Run the soak against a running server (process ``pid``) with the five ADAPTERS loaded."""
    lora_ids = {a["id"]: a["lora_id"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]}
    combos = make_combos(load_prompts(opts.prompts, opts.prompt_chars, opts.seed), selectors(list(ADAPTERS), lora_ids, opts.named_mix))
    t0 = time.perf_counter()
    alone = run_alone(url, combos, opts.max_tokens)
    log(f"soak: {len(combos)} combos run alone in {time.perf_counter() - t0:.1f} s")
    warm = [[Planned(f"warm-{c}", c % len(combos), c % 2 == 0, False)] for c in range(opts.clients)]
    asyncio.run(run_clients(url, warm, combos, opts.max_tokens, time.monotonic() + 600))
    m0, rss0 = wait_idle(url), rss_mib(pid)
    plan = make_plan(opts, len(combos))
    with RssSampler(pid) as sampler:
        outcomes, wall = asyncio.run(run_clients(url, plan, combos, opts.max_tokens, time.monotonic() + opts.max_seconds))
    m1, rss1 = wait_idle(url), rss_mib(pid)
    for o in outcomes:
        if o.kind == "complete":
            o.verdict = verdict(o, alone[o.combo])
    report = summarise(outcomes, wall, opts.clients * opts.requests)
    report["rss_mib"] = {"after_warmup": round(rss0, 1), "end": round(rss1, 1), "samples": sampler.samples}
    report["checks"] = run_checks(outcomes, m0, m1, (rss0, rss1), opts)
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    report["options"], report["combos"] = asdict(opts), len(combos)
    return report


def prepare_adapters(dest: Path) -> Path:
    """A folder with copies of the ADAPTERS' PEFT folders (the server converts them on the fly)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTERS:
        if not (dest / name).exists():
            shutil.copytree(FIXTURES / name, dest / name)
    return dest


def server_args(adapter_dir: Path, config_dir: Path, *, n_seq_max: int, n_ctx: int, threads: int, max_queue: int) -> list[str]:
    """``loramux serve`` flags for a soak server, with NAMED_MIX in a config file."""
    config = config_dir / "soak.toml"
    config.write_text(f"[mixes]\n{NAMED_MIX} = {{ {ADAPTERS[0]} = 0.5, {ADAPTERS[2]} = 0.5 }}\n")
    return [
        "--config",
        str(config),
        "--adapters",
        str(adapter_dir),
        "--n-seq-max",
        str(n_seq_max),
        "--n-ctx",
        str(n_ctx),
        "--threads",
        str(threads),
        "--max-queue",
        str(max_queue),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    d = SoakOptions()
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--clients", type=int, default=d.clients, help=f"concurrent clients (default: {d.clients})")
    ap.add_argument("--requests", type=int, default=d.requests, help=f"requests per client (default: {d.requests})")
    ap.add_argument("--max-seconds", type=float, default=d.max_seconds, help="no request starts after this (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per answer (default: %(default)s)")
    ap.add_argument("--stream-frac", type=float, default=d.stream_frac, help="share of streamed requests (default: %(default)s)")
    ap.add_argument("--cancel-frac", type=float, default=d.cancel_frac, help="share of streams cancelled (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=d.prompts, help="distinct prompts (default: %(default)s)")
    ap.add_argument("--rss-bound-mib", type=float, default=d.rss_bound_mib, help="allowed RSS growth (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--n-seq-max", type=int, default=8, help="the server's --n-seq-max (default: 8)")
    ap.add_argument("--n-ctx", type=int, default=256, help="the server's --n-ctx (default: 256)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the server's --threads (default: 1: on a 2-core machine shared with other work, llama.cpp's "
        "2-thread barriers stall for whole time slices and a decode step takes seconds)",
    )
    ap.add_argument("--json", type=Path, help="write the report here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from serve_proc import loramux_server_process

    opts = SoakOptions(
        clients=args.clients,
        requests=args.requests,
        max_seconds=args.max_seconds,
        max_tokens=args.max_tokens,
        stream_frac=args.stream_frac,
        cancel_frac=args.cancel_frac,
        prompts=args.prompts,
        rss_bound_mib=args.rss_bound_mib,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="loramux-soak-") as tmp:
        adapters = prepare_adapters(Path(tmp) / "adapters")
        flags = server_args(
            adapters, Path(tmp), n_seq_max=args.n_seq_max, n_ctx=args.n_ctx, threads=args.threads, max_queue=2 * args.clients + 8
        )
        with loramux_server_process(*flags, log_dir=Path(tmp)) as server:
            report = soak(server.url, server.pid, opts)
        report["server_flags"] = flags[2:]
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mib"}, indent=1))
    print(
        f"RSS MiB after warm-up {report['rss_mib']['after_warmup']}, at the end {report['rss_mib']['end']}; "
        f"{'PASS' if report['ok'] else 'FAIL'}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
