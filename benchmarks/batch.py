"""Aggregate decode throughput of concurrent requests with different adapter mixes.

Side by side in one process, for each number of concurrent requests N (each request gets its own
top-3 mix drawn from the 22 fixture adapters), greedy decoding of ``--steps`` tokens per request
after its prompt:

  (i)   native:   loramux per-sequence mixes, all N requests in one llama_decode per step;
  (ii)  grouped:  stock llama.cpp as llama-server does it: requests grouped by identical mix,
                  the group's mix set with llama_set_adapters_lora before its decode, group
                  after group (with N different mixes: N decodes of one token per step);
  (iii) same mix: all N requests under one mix, one decode per step (the upper bound);
  (iv)  single:   all N requests under one single adapter, one decode per step (for the
                  "top-3 over a 22-adapter pool vs a single adapter" ratio);
  (v)   pool size: all N requests under the first drawn top-3 mix on the native path, with the
                  whole pool registered vs only those 3 adapters (cost per token must not grow
                  with the pool);
  (vi)  per-token routing: all N requests routed per token and adapted weight inside the graph,
                  Arrow top-3 (T=1) and SpectR top-3 over the whole pool, against (i), the
                  fixed top-3 mixes (goal: Arrow >= 0.85x).

Also: the time to change one sequence's mix (the C call, and through the Python SeqMixer) and,
for comparison, what a stock mix change costs in the next decode.

Prints a table and, with ``--json OUT``, writes ``native_tokens_per_s``, ``grouped_tokens_per_s``,
``same_mix_tokens_per_s`` (medians, for the first N) and everything per N under ``by_requests``.

    .venv/bin/python benchmarks/batch.py --requests 8 32 --json out/batch.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
DEV = ROOT.parent / "shared" / "data" / "bbh" / "dev.jsonl"


CONFIGS = (
    "native",
    "grouped",
    "same_mix",
    "single_adapter",
    "native_no_mix",
    "base",
    "native_same_mix_full_pool",
    "native_same_mix_pool_of_3",
    "arrow_top3",
    "spectr_top3",
)


def ratios(out: dict) -> dict:
    """The side-by-side ratios of the median tokens/s."""
    tps = {k: out[f"{k}_tokens_per_s"] for k in CONFIGS}
    r = {
        "native_over_same_mix": tps["native"] / tps["same_mix"],
        "native_over_grouped": tps["native"] / tps["grouped"],
        "same_mix_over_grouped": tps["same_mix"] / tps["grouped"],
        "native_top3_over_single_adapter": tps["native"] / tps["single_adapter"],
        "native_full_pool_over_pool_of_3": tps["native_same_mix_full_pool"] / tps["native_same_mix_pool_of_3"],
        "arrow_top3_over_fixed_top3": tps["arrow_top3"] / tps["native"],
        "spectr_top3_over_fixed_top3": tps["spectr_top3"] / tps["native"],
    }
    return {k: round(v, 3) for k, v in r.items()}


def stock_groups(mixes: list[dict]) -> list[tuple[dict, list[int]]]:
    """The sequences grouped by identical mix, as llama-server decodes them (the drawn mixes are all different)."""
    groups: dict[tuple, list[int]] = {}
    for s, m in enumerate(mixes):
        groups.setdefault(tuple(sorted(m.items())), []).append(s)
    return [(dict(k), v) for k, v in groups.items()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    ap.add_argument("--requests", type=int, nargs="+", default=[8], help="numbers of concurrent requests (default: 8)")
    ap.add_argument("--steps", type=int, default=48, help="greedy tokens per request (default: 48)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each mode; medians are reported (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    ap.add_argument("--prompt-tokens", type=int, default=24, help="prompt length per request (default: 24)")
    ap.add_argument("--adapters", type=Path, help="folder of converted GGUF adapters (default: convert the fixtures)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device-form", action="store_true", help="native mixes on host buffers take the form device buffers use (ggml_mul_mat_id)"
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    return ap.parse_args(argv)


def convert_fixtures(dest: Path, base: Path) -> Path:
    from loramux.converters import convert_peft_to_gguf

    dest.mkdir(parents=True, exist_ok=True)
    for d in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        out = dest / f"{d.name}.gguf"
        if not out.exists():
            convert_peft_to_gguf(d, base, out, skip_embeddings=True)
    return dest


class Bench:
    def __init__(self, args):
        from loramux import native

        if not native.available():
            sys.exit(f"benchmarks/batch.py needs the native library: {native.status().reason}")
        import llama_cpp

        from loramux.base_model import default_base_model
        from loramux.llama_runtime import silence_llama_log

        self.lc = llama_cpp
        self.args = args

        silence_llama_log()
        llama_cpp.llama_backend_init()
        base = default_base_model()
        adapter_dir = args.adapters or convert_fixtures(Path(tempfile.gettempdir()) / "loramux-bench-adapters", base)
        self.model = llama_cpp.llama_model_load_from_file(str(base).encode(), llama_cpp.llama_model_default_params())
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.names = sorted(p.stem for p in adapter_dir.glob("*.gguf"))
        if len(self.names) < 3:
            sys.exit(f"need at least 3 adapters in {adapter_dir}")
        self.adapters = {n: llama_cpp.llama_adapter_lora_init(self.model, str(adapter_dir / f"{n}.gguf").encode()) for n in self.names}
        rows = [json.loads(line) for line in DEV.open()]
        random.Random(args.seed).shuffle(rows)
        self.prompts = []
        for r in rows:
            toks = self.tokenize(r["input"])[: args.prompt_tokens]
            if len(toks) == args.prompt_tokens:
                self.prompts.append(toks)

    def tokenize(self, text: str) -> list[int]:
        b = text.encode()
        buf = (self.lc.llama_token * (len(b) + 8))()
        n = self.lc.llama_tokenize(self.vocab, b, len(b), buf, len(buf), True, False)
        return list(buf[:n])

    def mixes(self, n: int) -> list[dict[str, float]]:
        rng = random.Random(self.args.seed + n)
        seen, out = set(), []
        while len(out) < n:
            trio = tuple(sorted(rng.sample(self.names, 3)))
            if trio in seen:
                continue
            seen.add(trio)
            w = [rng.uniform(0.2, 1.0) for _ in trio]
            s = sum(w)
            out.append({a: round(x / s, 3) for a, x in zip(trio, w)})
        return out

    def context(self, n_seq: int):
        from loramux.native import teacher

        n_ctx = n_seq * (self.args.prompt_tokens + self.args.steps + 16)
        return teacher.new_context(
            self.model,
            n_seq_max=n_seq,
            n_ctx=max(n_ctx, 256),
            n_batch=max(512, n_seq * self.args.prompt_tokens),
            n_threads=self.args.threads,
        )

    def stock(self, ctx, mix):
        from loramux.native import teacher

        teacher.set_stock_adapters(ctx, [(self.adapters[a], w) for a, w in (mix or {}).items()])

    def prefill(self, ctx, batch, seqs: list[int], prompts) -> dict[int, int]:
        rows = [(t, i, s, i == len(prompts[s]) - 1) for s in seqs for i, t in enumerate(prompts[s])]
        batch.set(*map(list, zip(*rows)))
        batch.decode(ctx)
        last = {s: k for k, (_, _, s, end) in enumerate(rows) if end}
        return {s: int(np.argmax(self.logits(ctx, i))) for s, i in last.items()}

    def logits(self, ctx, i):
        from loramux.native import teacher

        return teacher._logits(ctx, i, self.n_vocab)  # a NULL row raises, naming it

    def step(self, ctx, batch, seqs, nxt, pos) -> None:
        batch.set([nxt[s] for s in seqs], [pos] * len(seqs), list(seqs), True)
        batch.decode(ctx)
        for k, s in enumerate(seqs):
            nxt[s] = int(np.argmax(self.logits(ctx, k)))

    def run_groups(self, ctx, groups: list[tuple[dict | None, list[int]]], prompts, *, native_mixer=None) -> float:
        """Prefill (untimed), then time ``steps`` greedy steps; returns tokens/s over all sequences."""
        lc = self.lc
        n_seq = sum(len(g) for _, g in groups)
        from loramux.llama_batch import TokenBatch

        batch = TokenBatch(max(512, n_seq * self.args.prompt_tokens))
        try:
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            nxt = {}
            for mix, seqs in groups:
                if native_mixer is None:
                    self.stock(ctx, mix)
                nxt.update(self.prefill(ctx, batch, seqs, prompts))
            pos = self.args.prompt_tokens
            t0 = time.perf_counter()
            for _ in range(self.args.steps):
                for mix, seqs in groups:
                    if native_mixer is None and len(groups) > 1:
                        self.stock(ctx, mix)  # llama-server style: the group's adapters before its decode
                    self.step(ctx, batch, seqs, nxt, pos)
                pos += 1
            dt = time.perf_counter() - t0
        finally:
            batch.close()
        return n_seq * self.args.steps / dt

    def measure(self, n: int) -> dict:
        from loramux.native.mixer import SeqMixer

        mixes = self.mixes(n)
        prompts = {s: self.prompts[s % len(self.prompts)] for s in range(n)}
        ctx_native, ctx_stock, ctx_small = self.context(n), self.context(n), self.context(n)
        form = self.args.device_form
        mixer = SeqMixer(ctx_native, self.adapters, max_active=3, device_form=form)
        small = SeqMixer(ctx_small, {a: self.adapters[a] for a in mixes[0]}, max_active=3, device_form=form)
        res: dict[str, list[float]] = {k: [] for k in CONFIGS}
        grouped = stock_groups(mixes)
        for _ in range(self.args.runs):
            self.one_round(res, mixes, grouped, prompts, (ctx_native, mixer), ctx_stock, (ctx_small, small))
        out = {f"{k}_tokens_per_s": round(statistics.median(v), 2) for k, v in res.items()}
        out.update({f"{k}_tokens_per_s_runs": [round(x, 2) for x in v] for k, v in res.items()})
        out.update(ratios(out))
        out["pool_size"] = len(self.names)
        out["mixes"] = mixes
        out.update(self.mix_change_cost(ctx_native, mixer, ctx_stock))
        mixer.close()
        small.close()
        for ctx in (ctx_native, ctx_stock, ctx_small):
            self.lc.llama_free(ctx)
        return out

    def one_round(self, res, mixes, grouped, prompts, native, ctx_stock, small) -> None:
        """Every configuration once, back to back, so machine noise hits them alike."""
        (ctx_native, mixer), (ctx_small, small_mixer) = native, small
        seqs = list(prompts)
        for s, m in enumerate(mixes):
            mixer.set(s, m)
        res["native"].append(self.run_groups(ctx_native, [(None, seqs)], prompts, native_mixer=mixer))
        for s in seqs:
            mixer.clear(s)
        res["native_no_mix"].append(self.run_groups(ctx_native, [(None, seqs)], prompts, native_mixer=mixer))
        res["grouped"].append(self.run_groups(ctx_stock, grouped, prompts))
        res["same_mix"].append(self.run_groups(ctx_stock, [(mixes[0], seqs)], prompts))
        res["single_adapter"].append(self.run_groups(ctx_stock, [({self.names[0]: 1.0}, seqs)], prompts))
        res["base"].append(self.run_groups(ctx_stock, [(None, seqs)], prompts))
        for mixer_, ctx_, key in ((mixer, ctx_native, "native_same_mix_full_pool"), (small_mixer, ctx_small, "native_same_mix_pool_of_3")):
            for s in seqs:
                mixer_.set(s, mixes[0])
            res[key].append(self.run_groups(ctx_, [(None, seqs)], prompts, native_mixer=mixer_))
        for mode in ("arrow", "spectr"):
            for s in seqs:
                mixer.set_routing(s, mode, 3, 1.0)
            res[f"{mode}_top3"].append(self.run_groups(ctx_native, [(None, seqs)], prompts, native_mixer=mixer))

    def mix_change_cost(self, ctx_native, mixer, ctx_stock) -> dict:
        from loramux.native import _bindings as B

        lib = B.lib()
        ids = (ctypes.c_int32 * 3)(0, 5, 9)
        w = (ctypes.c_float * 3)(0.5, 0.3, 0.2)
        n = 20000
        t0 = time.perf_counter()
        for j in range(n):
            lib.loramux_set_seq_mix(ctx_native, j % 2, 3, ids, w)
        c_call_us = (time.perf_counter() - t0) / n * 1e6
        names = self.names
        t0 = time.perf_counter()
        for j in range(2000):
            mixer.set(j % 2, {names[j % 7]: 0.5, names[7 + j % 5]: 0.3, names[13 + j % 3]: 0.2})
        py_us = (time.perf_counter() - t0) / 2000 * 1e6
        # stock: one sequence, alternate between two mixes before every decode vs keep one mix
        lc = self.lc
        prompt = {0: self.prompts[0]}
        from loramux.llama_batch import TokenBatch

        batch = TokenBatch(512)
        try:

            def decode_ms(ctx, change, native):
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                if not native:
                    self.stock(ctx, {names[0]: 1.0})
                else:
                    mixer.set(0, {names[0]: 1.0})
                nxt = self.prefill(ctx, batch, [0], prompt)
                times = []
                for t in range(24):
                    if change:
                        m = {names[t % 2]: 1.0}
                        mixer.set(0, m) if native else self.stock(ctx, m)
                    t0 = time.perf_counter()
                    self.step(ctx, batch, [0], nxt, self.args.prompt_tokens + t)
                    times.append(time.perf_counter() - t0)
                return statistics.median(times[4:]) * 1e3

            stock_same, stock_change = decode_ms(ctx_stock, False, False), decode_ms(ctx_stock, True, False)
            native_same, native_change = decode_ms(ctx_native, False, True), decode_ms(ctx_native, True, True)
            self.stock(ctx_stock, None)
            mixer.clear(0)
        finally:
            batch.close()
        return {
            "set_seq_mix_c_call_us": round(c_call_us, 3),
            "set_seq_mix_python_us": round(py_us, 2),
            "stock_decode_ms_same_mix": round(stock_same, 3),
            "stock_decode_ms_mix_changed": round(stock_change, 3),
            "native_decode_ms_same_mix": round(native_same, 3),
            "native_decode_ms_mix_changed": round(native_change, 3),
        }


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    by_n = {}
    for n in args.requests:
        r = bench.measure(n)
        by_n[str(n)] = r
        print(
            f"N={n:3d}  native {r['native_tokens_per_s']:8.1f}  grouped {r['grouped_tokens_per_s']:8.1f}  "
            f"same-mix {r['same_mix_tokens_per_s']:8.1f}  single {r['single_adapter_tokens_per_s']:8.1f}  "
            f"base {r['base_tokens_per_s']:8.1f}  tokens/s | native/same {r['native_over_same_mix']:.3f}  "
            f"native/grouped {r['native_over_grouped']:.2f}  top3/single {r['native_top3_over_single_adapter']:.3f}"
        )
        print(
            f"       set mix: C call {r['set_seq_mix_c_call_us']:.3f} us, Python {r['set_seq_mix_python_us']:.2f} us | "
            f"decode after a mix change: stock {r['stock_decode_ms_mix_changed']:.2f} ms vs {r['stock_decode_ms_same_mix']:.2f} ms, "
            f"native {r['native_decode_ms_mix_changed']:.2f} ms vs {r['native_decode_ms_same_mix']:.2f} ms"
        )
        print(
            f"       one top-3 mix, native: pool of {r['pool_size']} {r['native_same_mix_full_pool_tokens_per_s']:.1f} vs pool of 3 "
            f"{r['native_same_mix_pool_of_3_tokens_per_s']:.1f} tokens/s (ratio {r['native_full_pool_over_pool_of_3']:.3f})"
        )
        print(
            f"       per-token routing over {r['pool_size']}: Arrow top-3 {r['arrow_top3_tokens_per_s']:.1f}, SpectR top-3 "
            f"{r['spectr_top3_tokens_per_s']:.1f} tokens/s | vs fixed top-3: Arrow {r['arrow_top3_over_fixed_top3']:.3f}, "
            f"SpectR {r['spectr_top3_over_fixed_top3']:.3f}"
        )
    first = by_n[str(args.requests[0])]
    result = {
        "native_tokens_per_s": first["native_tokens_per_s"],
        "grouped_tokens_per_s": first["grouped_tokens_per_s"],
        "same_mix_tokens_per_s": first["same_mix_tokens_per_s"],
        "requests": args.requests,
        "steps": args.steps,
        "runs": args.runs,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "by_requests": by_n,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
