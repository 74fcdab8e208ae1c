"""The learned router, trained once for this module on the real 22-task train split.

Routing alone needs no generation, so the dev-set accuracy check is fast. Torch and ONNX outputs
are compared on real prompts with dynamic batch and sequence lengths; the selection policy is
checked on the router's real outputs; every refusal (wrong adapters, wrong base, corrupt file,
non-ONNX file, ONNX that is not a router) is checked with the real file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import BBH, FIXTURES, load_rows

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from loramux.mix import Mix  # noqa: E402
from loramux.router import (  # noqa: E402
    METADATA_KEY,
    Router,
    RouterError,
    RouterFileError,
    RouterMismatchError,
    RouterSettingsError,
    SelectionSettings,
    select,
)
from loramux.router.features import pad_batch  # noqa: E402
from loramux.router.train import NONE_LABEL, TrainConfig, train_router  # noqa: E402

HELDOUT = set(json.loads((BBH / "tasks.json").read_text())["heldout_tasks"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_model, shared_dir):
    """One training run on train.jsonl (default config), checked on dev.jsonl; the ONNX file in a tmp dir."""
    out = tmp_path_factory.mktemp("router") / "router.onnx"
    rows = load_rows("train")
    dev = load_rows("dev")
    result = train_router(base_model, FIXTURES, rows, out, config=TrainConfig(), check_rows={"dev": dev})
    return result


@pytest.fixture(scope="module")
def router(trained, base_model):
    with Router.load(trained.path, base=base_model) as r:
        yield r


@pytest.fixture(scope="module")
def dev_rows():
    return load_rows("dev")


# --- training -----------------------------------------------------------------------------------


def test_training_rows_and_outcomes(trained):
    meta = trained.metadata
    fixture_names = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
    assert list(meta.adapters) == fixture_names
    assert meta.none_outcome is True
    assert trained.outcomes == fixture_names + [NONE_LABEL]
    # at most five rows of each held-out task (the LoraHub limit), all five tasks present
    assert meta.training["none_rows"] == {t: 5 for t in sorted(HELDOUT)}
    assert meta.training["trainable_parameters"] < 3_000_000
    assert trained.model.n_trainable == meta.training["trainable_parameters"]


def test_held_out_check_and_dev_routing_accuracy(trained):
    assert trained.validation is not None and trained.validation.n > 200
    assert trained.validation.accuracy >= 0.95, trained.validation.summary()
    (dev,) = trained.checks
    assert dev.adapter_rows == sum(1 for r in load_rows("dev") if r["task"] not in HELDOUT)
    assert dev.adapter_accuracy >= 0.95, dev.summary()
    assert dev.none_rows == 250


def test_onnx_router_routes_dev_prompts(router, dev_rows):
    """The same accuracy through the file: tokenizer + onnxruntime + selection, as users run it."""
    rows = [r for r in dev_rows if r["task"] not in HELDOUT]
    routings = []
    for i in range(0, len(rows), 64):
        routings += router.route_batch([r["input"] for r in rows[i : i + 64]])
    top1 = np.mean([rt.top1 == r["task"] for rt, r in zip(routings, rows)])
    assert top1 >= 0.95
    # the mix's highest-weight adapter is the task's adapter (what eval's routing_top1_accuracy counts)
    hits = [not rt.mix.is_base and max(rt.mix, key=rt.mix.get) == r["task"] for rt, r in zip(routings, rows)]
    assert np.mean(hits) >= 0.95


# --- export: torch vs onnxruntime -----------------------------------------------------------------


def test_onnx_matches_torch_with_dynamic_batch_and_length(trained, router, dev_rows):
    prompts = [dev_rows[i]["input"] for i in (0, 60, 130, 400, 700, 1000, 1290)]
    seqs = [router.token_ids(p) for p in prompts]
    assert len({len(s) for s in seqs}) == len(seqs)  # all lengths differ: padding matters
    for batch in ([seqs[0]], seqs[:3], seqs):
        ids, mask = pad_batch(batch)
        with torch.no_grad():
            expected = trained.model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = router.run_padded(ids, mask)
        assert got.shape == (len(batch), len(trained.outcomes))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # a prompt alone and inside a padded batch give the same logits
    alone = np.concatenate([router.logits_for_ids([s]) for s in seqs])
    np.testing.assert_allclose(router.logits_for_ids(seqs), alone, rtol=1e-5, atol=1e-5)


def test_onnx_file_structure_and_metadata(trained, base_model):
    from loramux.converters import read_base_model

    model = onnx.load(str(trained.path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [dims(i) for i in model.graph.input] == [["batch", "sequence"], ["batch", "sequence"]]
    assert dims(model.graph.output[0]) == ["batch", len(trained.outcomes)]
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    assert meta["adapters"] == list(trained.metadata.adapters)
    assert meta["base_fingerprint"] == read_base_model(base_model).fingerprint
    assert meta["features"]["kind"] == "mean_token_embedding" and meta["features"]["source_tensor"] == "token_embd.weight"
    assert meta["selection"] == SelectionSettings().to_json()
    assert trained.path.stat().st_size < 20e6


# --- selection on real router outputs -------------------------------------------------------------


@pytest.fixture(scope="module")
def real_logits(router, dev_rows):
    """Logits of one dev prompt per task (22 with an adapter, 5 without)."""
    firsts = {}
    for r in dev_rows:
        firsts.setdefault(r["task"], r)
    rows = list(firsts.values())
    return rows, router.logits([r["input"] for r in rows])


def _probs(logits, t):
    z = logits / t
    e = np.exp(z - z.max())
    return e / e.sum()


def test_selection_defaults_pick_the_task_adapter_at_weight_one(router, real_logits):
    rows, logits = real_logits
    for row, lg in zip(rows, logits):
        if row["task"] in HELDOUT:
            continue
        rt = select(lg, router.adapters, router.settings, none_outcome=True)
        assert rt.top1 == row["task"]
        assert rt.fallback is None
        assert rt.mix == Mix({row["task"]: 1.0})


def test_selection_temperature_top_k_top_p_and_min_weight(router, real_logits):
    rows, logits = real_logits
    names = router.adapters
    lg = logits[[r["task"] for r in rows].index("logical_deduction_three_objects")]
    # a high temperature flattens the scores enough for several adapters to count
    t = 8.0
    p = _probs(lg.astype(np.float64), t)[: len(names)]
    order = np.argsort(-p)
    q = p / p.sum()
    s = SelectionSettings(temperature=t, top_k=4, top_p=1.0, min_weight=0.0, threshold=0.0)
    rt = select(lg, names, s, none_outcome=True)
    expected = {names[i]: q[i] / q[order[:4]].sum() for i in order[:4]}
    assert set(rt.mix) == set(expected)
    for n, w in expected.items():
        assert rt.mix[n] == pytest.approx(w, rel=1e-9)
    assert sum(rt.mix.values()) == pytest.approx(1.0)
    assert rt.scores[names[order[0]]] == pytest.approx(p[order[0]], rel=1e-9)
    # top-k = 1: the top adapter alone
    assert select(lg, names, s.with_overrides(top_k=1), none_outcome=True).mix == Mix({names[order[0]]: 1.0})
    # top-p: a p just above the first two adapters' renormalised mass keeps exactly three
    cum = np.cumsum(q[order])
    p3 = float((cum[1] + cum[2]) / 2)
    rt3 = select(lg, names, s.with_overrides(top_k=10, top_p=p3), none_outcome=True)
    assert list(sorted(rt3.mix, key=rt3.mix.get, reverse=True)) == [names[i] for i in order[:3]]
    renorm = q[order[:3]] / q[order[:3]].sum()
    assert [rt3.mix[names[i]] for i in order[:3]] == pytest.approx(list(renorm), rel=1e-9)
    # min weight between the 3rd and 2nd renormalised weights drops the 3rd, then renormalises
    mw = float((renorm[1] + renorm[2]) / 2)
    rt2 = select(lg, names, s.with_overrides(top_k=10, top_p=p3, min_weight=mw), none_outcome=True)
    assert set(rt2.mix) == {names[order[0]], names[order[1]]}
    assert rt2.mix[names[order[0]]] == pytest.approx(renorm[0] / renorm[:2].sum(), rel=1e-9)
    # a lower temperature sharpens: the top adapter's weight grows
    sharp = select(lg, names, s.with_overrides(temperature=2.0), none_outcome=True)
    assert sharp.mix[names[order[0]]] > rt.mix[names[order[0]]]


def test_selection_threshold_and_fallbacks(router, real_logits):
    rows, logits = real_logits
    names = router.adapters
    lg = logits[[r["task"] for r in rows].index("navigate")]
    rt = select(lg, names, SelectionSettings(), none_outcome=True)
    assert rt.fallback is None and rt.confidence > 0.5
    # a threshold above the confidence falls back: base by default, uniform when asked
    high = SelectionSettings(threshold=min(1.0, rt.confidence + (1 - rt.confidence) / 2))
    default = select(lg, names, high, none_outcome=True)
    assert default.fallback == "low_confidence" and default.mix == Mix.uniform(names)  # the default fallback
    low = select(lg, names, high.with_overrides(fallback="base"), none_outcome=True)
    assert low.fallback == "low_confidence" and low.mix == Mix()
    uni = select(lg, names, high.with_overrides(fallback="uniform", fallback_weight=0.5), none_outcome=True)
    assert uni.mix == Mix({n: 0.5 / len(names) for n in names})
    # a held-out prompt the router sends to "none" takes the fallback whatever the threshold
    none_rows = [(r, lg2) for r, lg2 in zip(rows, logits) if r["task"] in HELDOUT]
    picked = [select(lg2, names, SelectionSettings(threshold=0.0, fallback="base"), none_outcome=True) for _, lg2 in none_rows]
    nones = [p for p in picked if p.fallback == "none"]
    assert nones, "the router sent no held-out prompt to its none outcome"
    for p in nones:
        assert p.mix == Mix() and p.none_score > p.confidence


def test_selection_settings_are_validated():
    for bad in (
        dict(top_k=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature=0.0),
        dict(min_weight=1.0),
        dict(threshold=-0.1),
        dict(fallback="random"),
        dict(temperature=float("nan")),
    ):
        with pytest.raises(RouterSettingsError):
            SelectionSettings(**bad)
    with pytest.raises(RouterSettingsError, match="unknown selection"):
        SelectionSettings().with_overrides(topk=3)


def test_route_overrides_apply(router, dev_rows):
    prompt = dev_rows[0]["input"]
    flat = router.route(prompt, top_k=1, temperature=20.0, top_p=1.0, threshold=0.0)
    assert flat.mix == Mix({router.route(prompt).top1: 1.0}) and flat.confidence < router.route(prompt).confidence
    assert router.route(prompt, temperature=20.0).fallback == "low_confidence"
    assert router.route(prompt, threshold=1.0).fallback == "low_confidence"


# --- refusals ---------------------------------------------------------------------------------------


def test_adapter_names_must_match_the_pool(trained, base_model):
    names = list(trained.metadata.adapters)
    with pytest.raises(RouterMismatchError, match="word_sorting") as exc:
        Router.load(trained.path, base=base_model, adapters=[n for n in names if n != "word_sorting"])
    assert "--skip-embeddings" in str(exc.value)
    with pytest.raises(RouterMismatchError, match="does not know: \\['extra_adapter'\\]"):
        Router.load(trained.path, base=base_model, adapters=names + ["extra_adapter"])
    Router.load(trained.path, base=base_model, adapters=list(reversed(names))).close()  # order does not matter


def test_wrong_base_model_is_refused(trained, tmp_path):
    import gguf

    other = tmp_path / "other-base.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_tensor("token_embd.weight", np.ones((32, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(RouterMismatchError, match="fingerprint"):
        Router.load(trained.path, base=other)


def _rewrite_metadata(src: Path, dst: Path, change) -> None:
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    del model.metadata_props[:]
    change(props)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))


def test_fingerprint_in_the_file_is_checked(trained, base_model, tmp_path):
    def corrupt(props):
        meta = json.loads(props[METADATA_KEY])
        meta["base_fingerprint"] = "0000000000000000"
        props[METADATA_KEY] = json.dumps(meta)

    _rewrite_metadata(trained.path, tmp_path / "r.onnx", corrupt)
    with pytest.raises(RouterMismatchError, match="0000000000000000"):
        Router.load(tmp_path / "r.onnx", base=base_model)


def test_onnx_model_without_router_metadata_is_refused(trained, base_model, tmp_path):
    _rewrite_metadata(trained.path, tmp_path / "plain.onnx", lambda props: props.clear())
    with pytest.raises(RouterFileError, match="not a loramux router"):
        Router.load(tmp_path / "plain.onnx", base=base_model)


def test_corrupt_and_non_onnx_files_are_refused(trained, base_model, tmp_path):
    data = trained.path.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    shutil.copy(FIXTURES / "boolean_expressions" / "adapter_config.json", tmp_path / "config.onnx")
    for name in ("truncated.onnx", "text.onnx", "config.onnx"):
        with pytest.raises(RouterFileError, match="not a readable ONNX router"):
            Router.load(tmp_path / name, base=base_model)
    with pytest.raises(RouterFileError, match="does not exist"):
        Router.load(tmp_path / "absent.onnx", base=base_model)


def test_providers_default_and_override(trained, base_model):
    import onnxruntime as ort

    available = ort.get_available_providers()
    with Router.load(trained.path, base=base_model) as r:
        expected = "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
        assert r.providers[0] == expected
    with Router.load(trained.path, base=base_model, providers="cpu") as r:
        assert r.providers == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(RouterError, match="onnxruntime-gpu"):
            Router.load(trained.path, base=base_model, providers=["cuda"])


# --- command line ----------------------------------------------------------------------------------


def _loramux(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loramux", *args], capture_output=True, text=True)


def test_route_command_prints_the_mix(trained, dev_rows):
    row = next(r for r in dev_rows if r["task"] == "sports_understanding")
    done = _loramux("route", "--router", str(trained.path), "--adapters", str(FIXTURES), row["input"])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["mix"] == {"sports_understanding": 1.0}
    assert out["top1"] == "sports_understanding" and out["fallback"] is None
    assert out["providers"][0].endswith("ExecutionProvider")
    done = _loramux(
        "route", "--router", str(trained.path), "--top-k", "2", "--temperature", "30", "--top-p", "1", "--threshold", "0", row["input"]
    )
    assert len(json.loads(done.stdout)["mix"]) == 2
    bad = _loramux("route", "--router", str(FIXTURES / "boolean_expressions" / "adapter_config.json"), "x")
    assert bad.returncode == 2 and "not a readable ONNX router" in bad.stderr
