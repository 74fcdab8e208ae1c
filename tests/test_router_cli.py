"""`loramux router train` / `router info` / `eval --mix router:PATH` on a small real pool (three adapters).

The router trained here is small (three adapters, a few epochs) so the module stays fast; the
22-task router is checked in test_router_trained.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import BBH, FIXTURES, load_rows
from conftest import ROUTER_NONE_TASK as NONE_TASK
from conftest import ROUTER_TASKS as TASKS
from conftest import write_rows as _write_rows

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _loramux(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "loramux", *args], capture_output=True, text=True, env=full_env)


def test_router_train_command(small_router):
    out, done = small_router
    assert out.is_file()
    assert "held-out check" in done.stdout and "dev.jsonl: top-1 routing accuracy" in done.stdout
    assert "train:" in done.stderr  # the progress bar (forced on with LORAMUX_PROGRESS=1)
    assert f"5 rows from 1 task(s) without an adapter (at most 5 each): {NONE_TASK}" in done.stderr
    line = next(s for s in done.stdout.splitlines() if "dev.jsonl: top-1" in s)
    assert float(line.split("accuracy ")[1].split()[0]) >= 0.95


def test_router_info_command(small_router, base_model):
    from loramux.converters import read_base_model

    out, _ = small_router
    done = _loramux("router", "info", str(out))
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout)
    assert meta["adapters"] == TASKS and meta["none_outcome"] is True
    assert meta["base_fingerprint"] == read_base_model(base_model).fingerprint
    assert meta["training"]["none_rows"] == {NONE_TASK: 5}


def test_router_train_refuses_adapters_without_rows(tmp_path, small_pool_dir, base_model):
    data = _write_rows(tmp_path / "train.jsonl", load_rows("train", {"boolean_expressions"}, limit_per_task=20))
    out = tmp_path / "router.onnx"
    done = _loramux("router", "train", "--base", str(base_model), "--adapters", str(small_pool_dir), "--data", str(data), "-o", str(out))
    assert done.returncode == 2
    assert "no training rows for adapter(s) ['navigate', 'sports_understanding']" in done.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_eval_router_mode_on_a_real_pool(small_router, small_pool_dir, base_model):
    """The router mode of loramux eval: mixes come from the router; routing_top1_accuracy is reported."""
    from loramux.evaluate import ModeContext, make_policy
    from loramux.mix import Mix
    from loramux.pool import AdapterPool
    from loramux.router import RouterMismatchError

    out, _ = small_router
    rows = load_rows("dev", set(TASKS) | {NONE_TASK}, limit_per_task=8)
    with AdapterPool(base_model, n_ctx=512) as pool:
        pool.load_adapters(small_pool_dir)
        policy = make_policy(f"router:{out}", ModeContext(pool=pool, rows=rows))
        mixes = [policy.mix_for(r) for r in rows]
        report = policy.report()
        # what `loramux run --router PATH` uses (a bare path is the trained router's spec)
        from loramux.cli.mix_choice import MixChoice

        first = next(r for r in rows if r["task"] == "navigate")
        choice = MixChoice(pool, str(out))
        mix, routing = choice.for_prompt(first["input"])
        choice.close()
        assert mix == Mix({"navigate": 1.0}) and routing.top1 == "navigate" and routing.fallback is None
    for row, mix in zip(rows, mixes):
        if row["task"] in TASKS:
            assert mix == Mix({row["task"]: 1.0})
    assert report["routing_top1_accuracy"] == 1.0
    assert report["routing"]["rows_with_adapter"] == 8 * len(TASKS)
    assert sum(report["routing"]["tasks_without_adapter"][NONE_TASK].values()) == 8
    # a pool with other adapters is refused
    with AdapterPool(base_model, n_ctx=512) as pool:
        pool.load(FIXTURES / "boolean_expressions")
        with pytest.raises(RouterMismatchError, match="navigate"):
            make_policy(f"router:{out}", ModeContext(pool=pool, rows=rows))


def test_eval_command_with_router(small_router, small_pool_dir, base_model, tmp_path):
    out, _ = small_router
    result = tmp_path / "eval.json"
    done = _loramux(
        "eval",
        "--base",
        str(base_model),
        "--adapters",
        str(small_pool_dir),
        "--data",
        str(BBH / "dev.jsonl"),
        "--tasks",
        "boolean_expressions,sports_understanding",
        "--limit-per-task",
        "1",
        "--mix",
        f"router:{out}",
        "--json",
        str(result),
        "--threads",
        "2",
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(result.read_text())
    assert data["routing_top1_accuracy"] == 1.0
    assert [r["mix"] for r in data["rows"]] == [{"boolean_expressions": 1.0}, {"sports_understanding": 1.0}]


def test_run_command_with_router(small_router, small_pool_dir, base_model):
    """loramux run --router: the router picks the prompt's adapter, and the answer runs under that mix."""
    out, _ = small_router
    prompt = load_rows("dev", {"sports_understanding"}, limit_per_task=1)[0]["input"]
    done = _loramux(
        "run",
        "--base",
        str(base_model),
        "--adapters",
        str(small_pool_dir),
        "--router",
        str(out),
        "--max-tokens",
        "4",
        "--threads",
        "2",
        prompt,
    )
    assert done.returncode == 0, done.stderr
    assert "[routed mix: sports_understanding=1.0 (top sports_understanding, 1.000)]" in done.stderr
    both = _loramux(
        "run", "--base", str(base_model), "--adapters", str(small_pool_dir), "--router", str(out), "--mix", "navigate=1", prompt
    )
    assert both.returncode == 2 and "either --mix or --router" in both.stderr
