"""Converting the PEFT fixtures to GGUF: loramux vs llama.cpp's convert_lora_to_gguf.py, side by side.

Usage::

    python benchmarks/convert.py [--repeats 3] [--outtype f16] [--json OUT.json]
    python benchmarks/convert.py --archs all [--repeats 3]     # per architecture (issue 23)

With ``--archs``, the adapters are the random PEFT LoRAs of tests/arch_reference.py (plain all-linear,
and rsLoRA + rank/alpha patterns) on each tiny random-weight model of tests/tiny_arch.py, and
upstream's ``--base`` is that model's Hugging Face folder.

Each repeat converts every fixture (22 by default) three ways, in one run, interleaved:

- ``loramux-cli``: one ``loramux convert`` process per adapter (what a user types);
- ``loramux-inprocess``: one process converting all of them with ``convert_peft_to_gguf``;
- ``upstream``: one ``convert_lora_to_gguf.py`` process per adapter (the pinned llama.cpp's
  script from the llama-cpp-python 0.3.36 sdist, with its vendored gguf-py and ``--base``
  pointing at a config.json rebuilt from the base GGUF, which it needs and loramux does not).

word_sorting goes through loramux with ``--skip-embeddings`` (its embedding LoRA cannot run on
the tied base); upstream converts it as it does (writing a file that aborts llama.cpp).

Reported per method: total wall time (min and median over repeats) and peak RSS of the
conversion processes (``wait4`` rusage, max over adapters). For loramux also the memory the
conversion itself allocates: RSS above the process's own RSS after imports, and the
``tracemalloc`` peak (Python + numpy buffers) of each ``convert_peft_to_gguf`` call, against
the size of the largest adapter file. Goals (issue 2): upstream total / loramux total >= 5,
loramux conversion memory < 3x the largest adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
EMBEDDING_ONLY_SKIP = {"word_sorting"}
sys.path.insert(0, str(ROOT / "tests"))  # upstream_converter: the helper shared with the tests


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in bytes of that process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def loramux_cli(fixtures: list[Path], base: Path, out: Path, outtype: str) -> dict:
    exe = str(Path(sys.executable).with_name("loramux"))
    per = {}
    for fx in fixtures:
        cmd = [exe, "convert", str(fx), "--base", str(base), "--outtype", outtype, "-o", str(out / f"{fx.name}.gguf")]
        if fx.name in EMBEDDING_ONLY_SKIP:
            cmd.append("--skip-embeddings")
        per[fx.name] = _run(cmd)
    return _summary(per)


def upstream(fixtures: list[Path], config_dir: Path, out: Path, outtype: str) -> dict:
    from upstream_converter import upstream_command, upstream_env

    env = upstream_env(single_thread=False)
    per = {fx.name: _run(upstream_command(fx, config_dir, out / f"{fx.name}.gguf", outtype), env) for fx in fixtures}
    return _summary(per)


def loramux_inprocess(fixtures: list[Path], base: Path, out: Path, outtype: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(base), str(out), outtype, *map(str, fixtures)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"in-process worker failed:\n{stderr.decode()[-2000:]}")
    report = json.loads(stdout)
    report["process_wall_s"] = wall
    report["peak_rss"] = usage.ru_maxrss * 1024
    return report


def _summary(per: dict[str, tuple[float, int]]) -> dict:
    return {
        "total_s": sum(w for w, _ in per.values()),
        "peak_rss": max(r for _, r in per.values()),
        "per_adapter": {k: {"wall_s": w, "peak_rss": r} for k, (w, r) in per.items()},
    }


def _worker(base: str, out: str, outtype: str, fixtures: list[str]) -> int:
    """Child process: convert all in-process; time a clean pass, then a tracemalloc pass."""
    import resource
    import tracemalloc

    from loramux.converters import convert_peft_to_gguf, read_base_model

    def rss_now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rss_after_import = rss_now()
    t0 = time.perf_counter()
    read_base_model(base)
    read_base_s = time.perf_counter() - t0
    per = {}
    t0 = time.perf_counter()
    for fx in map(Path, fixtures):
        t = time.perf_counter()
        convert_peft_to_gguf(fx, base, Path(out) / f"{fx.name}.gguf", outtype=outtype, skip_embeddings=fx.name in EMBEDDING_ONLY_SKIP)
        per[fx.name] = {"wall_s": time.perf_counter() - t}
    total = time.perf_counter() - t0
    peak_rss_converting = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for fx in map(Path, fixtures):
        tracemalloc.start()
        convert_peft_to_gguf(fx, base, Path(out) / f"{fx.name}.gguf", outtype=outtype, skip_embeddings=fx.name in EMBEDDING_ONLY_SKIP)
        per[fx.name]["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    json.dump(
        {
            "total_s": total + read_base_s,
            "read_base_s": read_base_s,
            "rss_after_import": rss_after_import,
            "peak_rss_converting": peak_rss_converting,
            "per_adapter": per,
        },
        sys.stdout,
    )
    return 0


def _import_baseline_rss() -> int:
    """Peak RSS of a process that only imports what ``loramux convert`` imports."""
    return _run([sys.executable, "-c", "import loramux.cli, loramux.converters, gguf, numpy"])[1]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (default 3); min and median are reported")
    parser.add_argument(
        "--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="tensor type for both converters (default f16)"
    )
    parser.add_argument(
        "--fixtures", type=Path, default=FIXTURES, help="folder of PEFT adapters (default ../shared/fixtures/smollm2-bbh-lora)"
    )
    parser.add_argument("--base", type=Path, default=None, help="base GGUF (default: loramux's embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--json", type=Path, default=None, help="write all measurements here")
    parser.add_argument(
        "--archs",
        default=None,
        help="comma-separated tiny-model keys of tests/tiny_arch.py (llama,qwen2,...) or 'all': per-architecture table",
    )
    return parser.parse_args(argv)


def _measure(args: argparse.Namespace, base: Path, fixtures: list[Path], hf_dir: Path | None = None) -> tuple[dict[str, list[dict]], int]:
    """Every repeat runs the three methods back to back; returns (runs per method, import-baseline RSS)."""
    from upstream_converter import base_config_dir

    runs: dict[str, list[dict]] = {"loramux-cli": [], "loramux-inprocess": [], "upstream": []}
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        config_dir = hf_dir or base_config_dir(base, Path(tmp) / "base")
        for i in range(args.repeats):
            for method in runs:
                out = Path(tmp) / f"{method}-{i}"
                out.mkdir()
                if method == "loramux-cli":
                    result = loramux_cli(fixtures, base, out, args.outtype)
                elif method == "loramux-inprocess":
                    result = loramux_inprocess(fixtures, base, out, args.outtype)
                else:
                    result = upstream(fixtures, config_dir, out, args.outtype)
                runs[method].append(result)
                print(
                    f"repeat {i + 1}: {method:18s} {result['total_s']:7.2f} s, peak RSS {result['peak_rss'] / 2**20:6.0f} MiB",
                    file=sys.stderr,
                )
        baseline = _import_baseline_rss()
    return runs, baseline


def _method_stats(results: list[dict]) -> dict:
    totals = [r["total_s"] for r in results]
    return {"min_s": min(totals), "median_s": statistics.median(totals), "peak_rss_mib": max(r["peak_rss"] for r in results) / 2**20}


def _memory(table: dict, inproc: dict, baseline: int, largest_bytes: int) -> dict:
    """loramux's conversion memory against the largest adapter file."""
    converting_extra = inproc["peak_rss_converting"] - inproc["rss_after_import"]
    traced = max(v["tracemalloc_peak"] for v in inproc["per_adapter"].values())
    cli_above = table["loramux-cli"]["peak_rss_mib"] * 2**20 - baseline
    return {
        "import_baseline_rss_mib": baseline / 2**20,
        "cli_peak_rss_above_import_baseline_mib": cli_above / 2**20,
        "inprocess_rss_growth_while_converting_mib": converting_extra / 2**20,
        "max_tracemalloc_peak_per_conversion_mib": traced / 2**20,
        "tracemalloc_peak_over_largest_adapter": traced / largest_bytes,
        "cli_rss_above_baseline_over_largest_adapter": cli_above / largest_bytes,
    }


def _summarise(args: argparse.Namespace, runs: dict[str, list[dict]], baseline: int, sizes: dict[str, int]) -> dict:
    largest = max(sizes, key=sizes.get)
    table = {m: _method_stats(r) for m, r in runs.items()}
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "adapters": len(sizes),
        "outtype": args.outtype,
        "repeats": args.repeats,
        "largest_adapter": {"name": largest, "bytes": sizes[largest]},
        "methods": table,
        "speedup_cli_vs_upstream": {k: table["upstream"][k] / table["loramux-cli"][k] for k in ("min_s", "median_s")},
        "speedup_inprocess_vs_upstream": {k: table["upstream"][k] / table["loramux-inprocess"][k] for k in ("min_s", "median_s")},
        # same repeat = measured back to back, under the same machine load
        "speedup_cli_vs_upstream_per_repeat": [u["total_s"] / c["total_s"] for u, c in zip(runs["upstream"], runs["loramux-cli"])],
        "loramux_memory": _memory(table, runs["loramux-inprocess"][-1], baseline, sizes[largest]),
    }


def _print_report(summary: dict) -> None:
    print(f"\n{'method':20s} {'min s':>8s} {'median s':>9s} {'peak RSS MiB':>13s}")
    for m, s in summary["methods"].items():
        print(f"{m:20s} {s['min_s']:8.2f} {s['median_s']:9.2f} {s['peak_rss_mib']:13.0f}")
    sp, si, mem = summary["speedup_cli_vs_upstream"], summary["speedup_inprocess_vs_upstream"], summary["loramux_memory"]
    print(f"\nupstream / loramux-cli:       {sp['min_s']:.1f}x (min), {sp['median_s']:.1f}x (median)")
    print(f"upstream / loramux-inprocess: {si['min_s']:.1f}x (min), {si['median_s']:.1f}x (median)")
    print("upstream / loramux-cli per repeat: " + ", ".join(f"{r:.1f}x" for r in summary["speedup_cli_vs_upstream_per_repeat"]))
    print(
        f"loramux memory: import baseline {mem['import_baseline_rss_mib']:.0f} MiB; CLI peak above it "
        f"{mem['cli_peak_rss_above_import_baseline_mib']:.1f} MiB ({mem['cli_rss_above_baseline_over_largest_adapter']:.2f}x the largest adapter); "
        f"tracemalloc peak per conversion {mem['max_tracemalloc_peak_per_conversion_mib']:.1f} MiB "
        f"({mem['tracemalloc_peak_over_largest_adapter']:.2f}x the largest adapter, "
        f"{summary['largest_adapter']['bytes'] / 2**20:.1f} MiB)"
    )


def arch_main(args: argparse.Namespace) -> int:
    """One table row per architecture: loramux CLI vs upstream's script on two random adapters of its tiny model."""
    from arch_reference import ADAPTER_KINDS
    from tiny_arch import SPECS, ensure_built

    keys = list(SPECS) if args.archs == "all" else args.archs.split(",")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-archs-") as tmp:
        # torch in a child: a process forked from a parent holding torch starts with its RSS (ru_maxrss)
        subprocess.run([sys.executable, __file__, "--make-adapters", tmp, *keys], check=True)
        for key, folder in ensure_built(keys).items():
            adapters = [Path(tmp) / key / kind for kind in ADAPTER_KINDS]
            sizes = {p.name: (p / "adapter_model.safetensors").stat().st_size for p in adapters}
            runs, baseline = _measure(args, folder / "base-f32.gguf", adapters, hf_dir=folder)
            rows[key] = _summarise(args, runs, baseline, sizes)
    print(f"\n{'arch':10s} {'loramux-cli s':>14s} {'upstream s':>11s} {'ratio':>7s} {'loramux MiB':>12s} {'upstream MiB':>13s}")
    for key, summary in rows.items():
        m = summary["methods"]
        print(
            f"{key:10s} {m['loramux-cli']['median_s']:14.2f} {m['upstream']['median_s']:11.2f} "
            f"{summary['speedup_cli_vs_upstream']['median_s']:6.1f}x {m['loramux-cli']['peak_rss_mib']:12.0f} {m['upstream']['peak_rss_mib']:13.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.archs:
        return arch_main(args)
    from loramux.base_model import default_base_model

    from upstream_converter import script_path

    base = args.base or default_base_model()
    fixtures = sorted(p for p in args.fixtures.iterdir() if (p / "adapter_config.json").is_file())
    script_path()  # fetch the pinned sdist before timing anything
    sizes = {p.name: (p / "adapter_model.safetensors").stat().st_size for p in fixtures}
    largest = max(sizes, key=sizes.get)
    print(
        f"{len(fixtures)} adapters, largest {largest} {sizes[largest] / 1e6:.2f} MB; outtype {args.outtype}; {args.repeats} repeats",
        file=sys.stderr,
    )
    runs, baseline = _measure(args, base, fixtures)
    summary = _summarise(args, runs, baseline, sizes)
    _print_report(summary)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


def _make_adapters(tmp: str, keys: list[str]) -> int:
    """Child process: the random PEFT adapters of each tiny model, under ``tmp/KEY/KIND``."""
    from arch_reference import ADAPTER_KINDS, make_adapter
    from tiny_arch import ensure_built

    for key, folder in ensure_built(keys).items():
        for kind in ADAPTER_KINDS:
            make_adapter(folder, Path(tmp) / key / kind, kind)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--make-adapters":
        sys.exit(_make_adapters(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]))
    sys.exit(main())
