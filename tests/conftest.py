"""Shared test fixtures: the real base model, the real PEFT fixtures, converted once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from floors import GAP_FLOOR  # noqa: F401  (re-exported: the tests that import it from here)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "smollm2-bbh-lora"
BAD_FIXTURES = SHARED / "fixtures" / "bad-adapters"
BBH = SHARED / "data" / "bbh"

# Fixtures by the PEFT features they exercise (see ../shared/README.md).
PLAIN = ["boolean_expressions", "causal_judgement", "disambiguation_qa", "sports_understanding", "hyperbaton"]
RSLORA = [
    "dyck_languages",
    "logical_deduction_seven_objects",
    "salient_translation_error_detection",
    "tracking_shuffled_objects_seven_objects",
]
PATTERNS = ["object_counting"]
EMBEDDING = ["word_sorting"]


def native_missing(reason: str) -> None:
    """The native library is not in use: skip, or fail under LORAMUX_REQUIRE_NATIVE=1 (as CI runs)."""
    if os.environ.get("LORAMUX_REQUIRE_NATIVE") == "1":
        pytest.fail(f"native library required (LORAMUX_REQUIRE_NATIVE=1) but not in use: {reason}")
    pytest.skip(f"loramux native library not in use: {reason}")


def run_worker(script: str | os.PathLike, *args: object, env: dict[str, str] | None = None, timeout: float = 600) -> None:
    """Run ``python SCRIPT ARGS`` in a fresh process (so that loramux.native loads the patched
    libllama before llama_cpp) without the parent's LLAMA_CPP_LIB_PATH; fail with its output if it dies."""
    clean = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"} | (env or {})
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{Path(script).name} {' '.join(map(str, args))} exited with {proc.returncode}:\n{proc.stdout[-4000:]}"


def write_adapter_variant(src: Path, out: Path, edit: Callable[[dict[str, tuple[Any, Any]]], None], base: Path | None = None) -> Path:
    """A copy of the GGUF adapter ``src`` (f32) whose ``{module: (lora_a, lora_b)}`` arrays ``edit`` changed in place
    (``base``: the base GGUF it is for, the default model when None)."""
    import gguf
    import numpy as np

    from loramux.base_model import default_base_model
    from loramux.converters.base_gguf import read_base_model
    from loramux.converters.gguf_adapter import AdapterHeader, GgufLoraTensors, write_gguf_lora

    reader = gguf.GGUFReader(src)
    alpha = float(reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents())
    arrays = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    modules = {n[: -len(".lora_a")]: (arrays[n], arrays[n[:-1] + "b"]) for n in arrays if n.endswith(".lora_a")}
    edit(modules)
    planned = [GgufLoraTensors(n, a, b) for n, (a, b) in sorted(modules.items())]
    header = AdapterHeader(name=out.stem, alpha=alpha, source="test", peft_type="LORA")
    return write_gguf_lora(out, planned, read_base_model(base or default_base_model()), header, outtype="f32")


def lora_factors(gguf_path: Path, tensor: str):
    """(A (r, in), B (out, r), k = alpha/r as llama.cpp scales it) of ``tensor`` in a GGUF adapter, or None when it
    does not adapt it: the numpy side of the oracles."""
    from loramux.converters.gguf_header import read_gguf_header
    from loramux.converters.gguf_to_torch import dequantized_tensors
    from loramux.converters.scale import llama_scaling

    arrays = dequantized_tensors(gguf_path, {f"{tensor}.lora_a", f"{tensor}.lora_b"})
    if len(arrays) < 2:
        return None
    a, b = arrays[f"{tensor}.lora_a"], arrays[f"{tensor}.lora_b"]
    alpha = float(read_gguf_header(gguf_path).metadata.get("adapter.lora.alpha") or 0.0)
    return a, b, llama_scaling(alpha, a.shape[0])


def all_fixture_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) if FIXTURES.is_dir() else []


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"{SHARED} with the fixtures must sit beside the project (see README)")
    return SHARED


@pytest.fixture(scope="session")
def base_model() -> Path:
    from loramux.base_model import default_base_model

    return default_base_model()


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, base_model, shared_dir) -> Path:
    """Every convertible fixture converted once at f16 (word_sorting with --skip-embeddings)."""
    from loramux.converters import convert_peft_to_gguf

    out = tmp_path_factory.mktemp("converted")
    for name in all_fixture_names():
        convert_peft_to_gguf(FIXTURES / name, base_model, out / f"{name}.gguf", skip_embeddings=name in EMBEDDING)
    return out


def load_rows(split: str, tasks: set[str] | None = None, limit_per_task: int | None = None) -> list[dict]:
    rows, seen = [], {}
    with (BBH / f"{split}.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if tasks is not None and row["task"] not in tasks:
                continue
            if limit_per_task is not None and seen.get(row["task"], 0) >= limit_per_task:
                continue
            seen[row["task"]] = seen.get(row["task"], 0) + 1
            rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# A small real pool (three adapters, copied so that it is a folder of its own) and a router trained on it.
ROUTER_TASKS = ["boolean_expressions", "navigate", "sports_understanding"]
ROUTER_NONE_TASK = "web_of_lies"


@pytest.fixture(scope="session")
def small_pool_dir(tmp_path_factory, shared_dir) -> Path:
    folder = tmp_path_factory.mktemp("small-pool")
    for name in ROUTER_TASKS:
        shutil.copytree(FIXTURES / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def small_router(tmp_path_factory, small_pool_dir, base_model) -> tuple[Path, subprocess.CompletedProcess]:
    """``loramux router train`` on the small pool (a few epochs: seconds)."""
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("small-router")
    tasks = set(ROUTER_TASKS) | {ROUTER_NONE_TASK}
    data = write_rows(tmp / "train.jsonl", load_rows("train", tasks))
    dev = write_rows(tmp / "dev.jsonl", load_rows("dev", tasks))
    out = tmp / "router.onnx"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loramux",
            "router",
            "train",
            "--base",
            str(base_model),
            "--adapters",
            str(small_pool_dir),
            "--data",
            str(data),
            "--check",
            str(dev),
            "--epochs",
            "15",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, LORAMUX_PROGRESS="1"),
    )
    assert done.returncode == 0, done.stderr
    return out, done


# The pool of the batching tests (test_pool_batch.py, test_engine.py): five adapters, six requests
# with different mixes (one base, one with a negative weight), one dev prompt per task.
BATCH_ADAPTERS = ["boolean_expressions", "navigate", "hyperbaton", "snarks", "sports_understanding"]
BATCH_MIXES = [
    {"boolean_expressions": 1.0},
    {"navigate": 0.6, "hyperbaton": 0.4},
    None,
    {"snarks": 1.0, "navigate": -0.3, "sports_understanding": 0.5},
    {"hyperbaton": 1.0},
    {"sports_understanding": 1.0},
]
BATCH_TASKS = ["boolean_expressions", "navigate", "hyperbaton", "snarks", "sports_understanding", "boolean_expressions"]


def open_batch_pool(base_model):
    """The batching tests' pool (a context manager)."""
    from loramux.pool import AdapterPool

    pool = AdapterPool(base_model, n_ctx=512, n_seq_max=4, max_active=3)
    for name in BATCH_ADAPTERS:
        pool.load(FIXTURES / name)
    return pool


def batch_conversations() -> list[list[dict]]:
    """One user turn per BATCH_TASKS entry (distinct dev rows)."""
    rows = load_rows("dev", tasks=set(BATCH_TASKS), limit_per_task=2)
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    return [[{"role": "user", "content": by_task[t].pop(0)["input"]}] for t in BATCH_TASKS]
