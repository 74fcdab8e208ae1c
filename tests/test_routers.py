"""Training-free routers on the real model and fixtures: the probe, retrieval, LoGo, pooled routing, the one registry.

Oracles: the probe's captured final norm times the (tied) output matrix gives llama.cpp's own
logits; LoGo's mix and the pooled routers' shares are the native record of a teacher-forced pass
(whose numbers tests/test_native_logo.py and test_native_routing.py check against numpy); retrieval's routing is checked
against the task labels it never saw, and a 23rd adapter converted at run time is picked for its
prompts with no retraining.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from loramux.errors import LoramuxError, MixError
from loramux.mix import Mix

from conftest import FIXTURES, GAP_FLOOR, all_fixture_names, load_rows, write_rows

TASKS = ["boolean_expressions", "dyck_languages", "hyperbaton", "navigate", "snarks", "sports_understanding"]
NEW_TASK = "date_understanding"  # a held-out task: no fixture is trained on it


@pytest.fixture(scope="module")
def pool(base_model, shared_dir):
    from loramux.pool import AdapterPool

    with AdapterPool(base_model, n_ctx=1024, n_seq_max=2) as p:
        for name in TASKS:
            p.load(FIXTURES / name)
        yield p


@pytest.fixture(scope="module")
def keys(pool):
    from loramux.router.retrieval import build_keys, samples_by_adapter

    return build_keys(pool, samples_by_adapter(load_rows("train", set(TASKS)), pool.names, 20))


def q8_0_round(x: np.ndarray) -> np.ndarray:
    """Activations as ggml's CPU matmul with Q8_0 weights sees them (blocks of 32, d = amax/127 stored fp16)."""
    b = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(b).max(axis=2, keepdims=True) / np.float32(127)
    v = b * np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)  # roundf: halves away from zero
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def test_probe_captures_the_tensors_llama_cpp_computes(pool):
    """The captured final norm through the tied Q8_0 output matrix is the pass's own logits (to 1e-3),
    and the pass is the request's up to llama.cpp's batch floor (cb_eval computes unfused)."""
    from loramux.router.features import token_embedding_table

    table = token_embedding_table(pool.base_path)
    tokens = pool.tokenize("not ( True ) and ( False ) is", add_bos=True)
    base = pool.logits(tokens, Mix(), path="context")
    for mix in (Mix(), Mix({"boolean_expressions": 1.0, "dyck_languages": 1.0})):
        got = pool.hidden_states(tokens, ["result_norm", "result_output", "attn_norm-29"], mix=mix, all_logits=True)
        assert got["attn_norm-29"].shape == (len(tokens), table.shape[1])
        np.testing.assert_allclose(q8_0_round(got["result_norm"]) @ table.T, got["result_output"], rtol=0, atol=1e-3)
        want = pool.logits(tokens, mix, path="context")
        assert np.abs(got["result_output"] - want).max() < GAP_FLOOR
    assert np.abs(want - base).max() > 4 * GAP_FLOOR  # the adapters were really set on the probe's pass
    with pytest.raises(LoramuxError, match="no tensor named nothing-here"):
        pool.probe().capture(tokens, ["nothing-here"])


def test_retrieval_routes_unseen_dev_prompts_to_their_task(pool, keys, tmp_path):
    from loramux.router.retrieval import RetrievalRouter

    path = keys.save(tmp_path / "keys.json")
    router = RetrievalRouter.load(path, pool=pool)
    rows = load_rows("dev", set(TASKS), limit_per_task=15)
    hits = 0
    for row in rows:
        routing = router.route(row["input"])
        assert abs(sum(routing.mix.values()) - 1) < 1e-9 and len(routing.mix) <= 3
        assert routing.mix[routing.top1] == max(routing.mix.values())
        hits += routing.top1 == row["task"]
    assert hits / len(rows) >= 0.95, hits
    uniform = RetrievalRouter.load(path, pool=pool, options="k=2,weights=uniform,min_weight=0")
    assert sorted(uniform.route(rows[0]["input"]).mix.values()) == [0.5, 0.5]


def test_retrieval_key_file_errors_name_the_file(pool, keys, tmp_path):
    from loramux.router.retrieval import RetrievalKeys, RetrievalRouter

    with pytest.raises(MixError, match="do not exist"):
        RetrievalKeys.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(MixError, match="not a loramux retrieval key file"):
        RetrievalKeys.load(bad)
    other = keys.save(tmp_path / "other.json")
    data = json.loads(other.read_text())
    data["base_fingerprint"] = "0" * 16
    other.write_text(json.dumps(data))
    with pytest.raises(MixError, match="another base model"):
        RetrievalRouter.load(other, pool=pool)
    with pytest.raises(MixError, match="unknown option 'q=1'"):
        RetrievalRouter.load(keys.save(tmp_path / "k.json"), pool=pool, options="q=1")


def test_a_23rd_adapter_added_at_run_time_is_routed_to_without_retraining(base_model, shared_dir, tmp_path):
    """21 fixtures + a 22nd, then a 23rd PEFT folder converted at run time: its prompts go to it."""
    from loramux.pool import AdapterPool
    from loramux.router.retrieval import RetrievalRouter, build_keys, samples_by_adapter

    names = [n for n in all_fixture_names() if n != "word_sorting"]  # 21 (its embedding LoRA needs a flag)
    new_peft = tmp_path / NEW_TASK
    shutil.copytree(FIXTURES / "geometric_shapes", new_peft)  # real PEFT weights under a new name
    train = load_rows("train")
    with AdapterPool(base_model, n_ctx=1024, n_seq_max=2) as pool:
        for name in names:
            pool.load(FIXTURES / name)
        pool.load(FIXTURES / "word_sorting", skip_embeddings=True)
        router = RetrievalRouter(build_keys(pool, samples_by_adapter(train, pool.names, 20)), pool)
        prompts = [r["input"] for r in load_rows("dev", {NEW_TASK}, limit_per_task=10)]
        assert all(router.route(p).top1 != NEW_TASK for p in prompts)
        pool.load(new_peft)  # converted now, 23 adapters
        assert len(pool.names) == 23
        router.add(NEW_TASK, [r["input"] for r in train if r["task"] == NEW_TASK][:20])
        assert sum(router.route(p).top1 == NEW_TASK for p in prompts) >= 9
        geometric = [r["input"] for r in load_rows("dev", {"geometric_shapes"}, limit_per_task=5)]
        assert all(router.route(p).top1 == "geometric_shapes" for p in geometric)  # the others keep their prompts
        pool.unload(NEW_TASK)  # removing one needs nothing either
        assert all(router.route(p).top1 != NEW_TASK for p in prompts)


def test_logo_is_the_graphs_record_at_the_last_prompt_token(pool):
    """LoGo's mix is the row the fused op recorded at the last layer's q projection and the last prompt token of a
    teacher-forced pass under logo-token routing (its norms are checked against numpy in tests/test_native_logo.py);
    the row at another layer (the control) is another mix."""
    from loramux.router.registry import open_router

    prompt = load_rows("dev", {"sports_understanding"}, limit_per_task=1)[0]["input"]
    router = open_router("logo:k=2,cal=spectral", pool)
    routing = router.route(prompt)
    tokens = router.tokens(prompt)
    rows = pool.token_choices(tokens, Mix.logo_token(k=2, calibration="spectral")).choices
    last = {c.module: dict(zip(c.adapters, c.weights)) for c in rows if c.pos == len(tokens) - 1}
    kept = pool.token_choices(tokens, Mix.logo_token(k=2, calibration="spectral"), modules={router.tensor}).choices
    assert list(kept) == [c for c in rows if c.module == router.tensor] and len(kept) == len(tokens)  # the record, filtered
    assert router.tensor == f"blk.{pool.n_layer - 1}.attn_q.weight"
    assert dict(routing.mix) == pytest.approx(last[router.tensor]) and len(routing.mix) == 2
    assert routing.top1 == max(last[router.tensor], key=last[router.tensor].get)
    assert last["blk.0.attn_q.weight"] != pytest.approx(last[router.tensor])
    with pytest.raises(MixError, match="unknown option"):
        open_router("logo:kk=1", pool)
    with pytest.raises(MixError, match="max_active"):
        open_router(f"logo:k={pool.max_active + 1}", pool)


def test_registry_drives_eval_and_run(pool, keys, tmp_path, capsys):
    from loramux.cli import main
    from loramux.evaluate import evaluate
    from loramux.router.registry import is_router_spec, open_router

    path = keys.save(tmp_path / "keys.json")
    rows = load_rows("dev", {"boolean_expressions", "sports_understanding"}, limit_per_task=2)
    result = evaluate(pool, rows, f"retrieval:{path}", max_tokens=4)
    assert result.extra["routing_top1_accuracy"] == 1.0
    assert all(max(r["mix"], key=r["mix"].get) == r["task"] for r in result.rows)
    mix_file = tmp_path / "mix.json"
    mix_file.write_text(json.dumps({"mix": {"navigate": 0.5, "snarks": -0.25}, "method": "hand"}))
    fixed = open_router(f"file:{mix_file}", pool)
    assert fixed.route("anything").mix == Mix({"navigate": 0.5, "snarks": -0.25})
    assert is_router_spec("logo") and is_router_spec("x.onnx") and not is_router_spec("navigate=1")
    with pytest.raises(MixError, match="unknown mix mode 'nope:1'.*retrieval:KEYS"):
        evaluate(pool, rows, "nope:1")
    data = write_rows(tmp_path / "rows.jsonl", rows)
    argv = [
        "--base",
        str(pool.base_path),
        "--adapters",
        str(FIXTURES / "boolean_expressions"),
        "--adapters",
        str(FIXTURES / "sports_understanding"),
    ]
    keys2 = tmp_path / "keys2.json"
    assert main(["router", "index", *argv, "--data", str(data), "-o", str(keys2)]) == 0
    assert main(["run", *argv, "--mix", f"retrieval:{keys2}", "--max-tokens", "3", rows[0]["input"]]) == 0
    err = capsys.readouterr().err
    assert "[routed mix: boolean_expressions=1" in err


def test_evaluate_and_the_router_package_import_without_a_cycle():
    import subprocess

    code = "import loramux.router, loramux.evaluate, loramux.router.registry as r; print(sorted(k.prefix for k in r.router_kinds()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['file', 'logo', 'pooled', 'retrieval', 'router']"


def test_the_server_routes_model_auto_with_retrieval_keys(keys, base_model, tmp_path):
    """``loramux serve --router retrieval:KEYS``: a real OpenAI client asks for model "auto"."""
    openai = pytest.importorskip("openai")
    from serve_proc import loramux_server

    path = keys.save(tmp_path / "keys.json")
    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in TASKS:
        (folder / name).symlink_to(FIXTURES / name)
    with loramux_server(
        "--base",
        str(base_model),
        "--adapters",
        str(folder),
        "--router",
        f"retrieval:{path},k=2",
        "--n-ctx",
        "512",
        "--threads",
        "2",
        log_dir=tmp_path,
    ) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for task in ("hyperbaton", "dyck_languages"):
            row = load_rows("dev", {task}, limit_per_task=1)[0]
            out = client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": row["input"]}], temperature=0, max_tokens=3
            )
            routing = out.model_extra["routing"]
            assert routing["top1"] == task and set(routing["scores"]) == set(TASKS)
            assert out.model_extra["mix"] == routing["mix"] and len(routing["mix"]) <= 2


def _content_span(pool, prompt: str):
    """The request's tokens of ``prompt`` (one user turn, as evaluate() sends it) and where the prompt's text lies,
    found from the token pieces (not by the router's own tokenization)."""
    tokens, _ = pool.text.prompt_of(None, [{"role": "user", "content": prompt}])
    pieces = [pool.piece(t) for t in tokens]
    text = "".join(pieces)
    at = text.index(prompt)
    ends = np.cumsum([len(p) for p in pieces])
    start = int(np.searchsorted(ends, at, side="right"))
    end = int(np.searchsorted(ends, at + len(prompt), side="left")) + 1
    return tokens, start, end


def test_pooled_arrow_is_the_pooled_record_of_the_teacher_forced_prompt(pool):
    """pooled:arrow's shares are the mean, over the prompt's own tokens, of what each token chose at every adapted
    weight (TokenChoiceReport.shares of a teacher-forced pass; the six fixtures all adapt q and v, and some more),
    its default scores those shares over the template tokens' shares, and its mix the top 2; pooling the
    template's tokens too (the negative control) gives other shares."""
    from loramux.router.pooled import EPS
    from loramux.router.registry import open_router

    prompt = load_rows("dev", {"hyperbaton"}, limit_per_task=1)[0]["input"]
    tokens, start, end = _content_span(pool, prompt)
    report = pool.token_choices(tokens, Mix.arrow(k=3))
    per_token = report.shares(pool.names, ["attn_q", "attn_v"])  # (adapters, tokens), each token's column sums to 1
    content = per_token[:, start:end].mean(axis=1)
    template = np.delete(per_token, np.s_[start:end], axis=1).mean(axis=1)
    assert np.abs(per_token.mean(axis=1) - content).max() > 1e-3, "the control: the template's tokens change the shares"
    for spec, want in [("pooled:arrow:k=2,baseline=none", content), ("pooled:arrow:k=2", (content + EPS) / (template + EPS))]:
        routing = open_router(spec, pool).route(prompt)
        got = np.array([routing.scores.get(n, 0.0) for n in pool.names])
        chosen = content > 0  # an adapter no content token chose has no score
        assert np.abs(got[chosen] - want[chosen]).max() < 1e-6 and not got[~chosen].any(), spec
        top = [pool.names[i] for i in np.argsort(-np.where(chosen, want, -1), kind="stable")[:2]]
        assert sorted(routing.mix) == sorted(top), spec
        i, j = (pool.names.index(n) for n in top)
        assert routing.mix[top[0]] == pytest.approx(want[i] / (want[i] + want[j]))


@pytest.mark.parametrize("spec", ["pooled:spectr:k=0", "pooled:nope", "pooled:spectr,T=2", "pooled:arrow:cal=spectral", "pooled:arrow:z=1"])
def test_pooled_specs_are_checked(pool, spec):
    from loramux.router.registry import open_router

    with pytest.raises(MixError, match="pooled"):
        open_router(spec, pool)


def test_pooled_arrow_picks_the_task_of_a_prompt_without_samples(pool):
    """Ten dev prompts of one fixture task: pooled:arrow (no samples, no training) puts that task's adapter first
    for at least 8; scored by the plain shares (baseline=none, the control), the always-chosen adapters win instead."""
    from loramux.router.registry import open_router

    rows = load_rows("dev", {"hyperbaton"}, limit_per_task=10)
    lifted, plain = open_router("pooled:arrow", pool), open_router("pooled:arrow:baseline=none", pool)
    assert sum(lifted.route(r["input"]).top1 == "hyperbaton" for r in rows) >= 8
    assert sum(plain.route(r["input"]).top1 == "hyperbaton" for r in rows) <= 5
