"""LoGo per-token routing in the graph (the fused CPU op) checked against numpy on the inputs it really saw.

LoGo scores each adapter by the norm of its own output, ``||D_e x|| / c_e`` (``D_e = s_e B_e A_e``, ``s_e`` the
adapter's scale as llama.cpp applies it: alpha/r, alpha/sqrt(r) for rsLoRA, folded into B by the converter),
keeps the top k and weights them ``s / sum(s)``. The op computes it as ``sqrt(t^T G_e t) / c_e`` with
``t = A_e x`` and ``G_e = B_s^T B_s`` from registration; ``c_e`` is 1 (``cal=none``), ``||D_e||_2``
(``spectral``) or ``||D_e||_F`` (``frobenius``).

One real batch of three sequences, one per calibration (k=3), runs on the pool of
tests/test_native_routing.py (ranks 4, 8 and 16, q/v, q/k/v/o and all-seven targets, an rsLoRA adapter);
a graph callback reads the fused op's input ``x`` and LoRA term at four adapted weights, and the record
gives each token's chosen adapters and weights. numpy routes every token itself from the GGUF files alone
and must agree (weights within LOGO_WEIGHT_ATOL, the term within KERNEL_REL_TOL). Negative controls: numpy
with the rsLoRA adapter at alpha/r instead of alpha/sqrt(r) (raw LoGo; the calibrated scores do not see a
scale) and numpy on another layer's input are caught at more than 10x the tolerance.

Calibration on synthetic adapters: one adapter, the same one with B x10 (the same direction, 10x the
scale) and one with B = 0, routed with k=3: the raw weights are 1/11, 10/11 and 0, the calibrated ones
0.5, 0.5 and 0 (a zero adapter scores 0, never NaN). The device form refuses LoGo (library and engine).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import test_native_routing as routing
from test_native_routing import (
    POOL,
    PROMPTS,
    _save_record,
    _tokenize,
    capture_callback,
    decode_prompts,
    lora_factors,
    prompt_rows,
    rel_errors,
    untied,
)

from conftest import native_missing, run_worker, write_adapter_variant
from floors import KERNEL_REL_TOL, LOGO_WEIGHT_ATOL

pool_dir = routing.pool_dir  # the module-scoped fixture of tests/test_native_routing.py: its pool, converted

CALS = ("none", "spectral", "frobenius")  # sequence s routes with CALS[s]
NATIVE = {"none": "logo", "spectral": "logo-spectral", "frobenius": "logo-frobenius"}  # SeqMixer's modes
K = 3
MAX_ACTIVE = 4
MODULES = ["blk.3.attn_q.weight", "blk.3.attn_v.weight", "blk.17.attn_q.weight", "blk.17.attn_output.weight"]
OTHER_LAYER = {"blk.3": "blk.17.attn_q.weight", "blk.17": "blk.3.attn_q.weight"}  # the wrong-layer control's x
RSLORA = "dyck_languages"  # r=16, use_rslora: llama.cpp's scale alpha/sqrt(r), folded into B by the converter
SYNTH = ("small", "big", "zero")  # one adapter, its B x10, its B x0
SYNTH_MODULES = ["blk.3.attn_q.weight", "blk.9.attn_output.weight"]


# ---------------------------------------------------------------- worker (subprocess) --
def _routing_pool(lc, model, pool_dir: Path, prompts, arrays: dict) -> None:
    """The pool of 9 with one sequence per calibration: captured inputs and terms, record, get_routing."""
    from loramux.llama_batch import new_context
    from loramux.native.mixer import SeqMixer

    adapters = {n: lc.llama_adapter_lora_init(model, str(pool_dir / f"{n}.gguf").encode()) for n in POOL}
    rows_seq, rows_pos = prompt_rows(prompts)
    got: dict[str, np.ndarray] = {}
    errors: list[str] = []
    callback = capture_callback({f"mux_lora-{m}": (m, "op") for m in MODULES}, len(rows_seq), got, errors)
    ctx = new_context(model, n_ctx=1024, n_seq_max=len(CALS), n_threads=1, kv_unified=True, cb_eval=callback)
    mixer = SeqMixer(ctx, adapters, max_active=MAX_ACTIVE)
    for s, cal in enumerate(CALS):
        mixer.set_routing(s, NATIVE[cal], K)
    arrays["get_routing"] = np.array([repr(mixer.get_routing(s)) for s in range(len(CALS))])
    mixer.record(True)
    decode_prompts(ctx, prompts)
    _save_record(arrays, mixer, MODULES)
    arrays |= {"rows_seq": rows_seq, "rows_pos": rows_pos, "errors": np.array(errors or [""])} | got


def _synthetic_pool(lc, model, synth_dir: Path, prompt, arrays: dict) -> None:
    """small / big / zero routed with k=3 under each calibration (one sequence each): the record of every weight."""
    from loramux.llama_batch import new_context
    from loramux.native.mixer import SeqMixer

    adapters = {n: lc.llama_adapter_lora_init(model, str(synth_dir / f"{n}.gguf").encode()) for n in SYNTH}
    ctx = new_context(model, n_ctx=256, n_seq_max=len(CALS), n_threads=1, kv_unified=True)
    mixer = SeqMixer(ctx, adapters, max_active=len(SYNTH))
    for s, cal in enumerate(CALS):
        mixer.set_routing(s, NATIVE[cal], len(SYNTH))
    mixer.record(True)
    decode_prompts(ctx, [prompt] * len(CALS))
    _save_record(arrays, mixer, None, prefix="syn")


def _device_form_refusals(lc, model, synth_dir: Path, arrays: dict) -> None:
    """What the device form answers to LoGo: the C status and reason, SeqMixer's error, the engine's check."""
    from loramux.engine.context import EngineContext
    from loramux.errors import MixError
    from loramux.llama_batch import new_context
    from loramux.mix import Mix
    from loramux.native import _bindings as B
    from loramux.native.mixer import SeqMixer

    adapters = {n: lc.llama_adapter_lora_init(model, str(synth_dir / f"{n}.gguf").encode()) for n in SYNTH}
    ctx = new_context(model, n_ctx=256, n_seq_max=1, n_threads=1, kv_unified=True)
    mixer = SeqMixer(ctx, adapters, max_active=2, device_form=True)
    rc = B.loramux_set_seq_routing(ctx, 0, B.LORAMUX_ROUTE_LOGO_SPECTRAL, 2, 1.0)
    arrays["dev_rc"], arrays["dev_reason"] = np.array(rc), np.array(B.reason(rc))
    arrays["dev_after"] = np.array(repr(mixer.get_routing(0)))  # unchanged: still no routing
    try:
        mixer.set_routing(0, "logo", 2)
        arrays["dev_mixer"] = np.array("accepted")
    except MixError as exc:
        arrays["dev_mixer"] = np.array(str(exc))
    mixer.set_routing(0, "spectr", 2)  # the refusal is LoGo's only
    arrays["dev_spectr"] = np.array(repr(mixer.get_routing(0)))
    engine_ctx = EngineContext(model, n_seq_max=1, n_ctx=256, native=True, device_form=True)
    try:
        engine_ctx.check_routable(Mix.logo_token(2, "frobenius"))
        arrays["dev_engine"] = np.array("accepted")
    except MixError as exc:
        arrays["dev_engine"] = np.array(str(exc))


def _worker(out: Path, pool_dir: Path, synth_dir: Path) -> None:
    from loramux import native

    if not native.available():
        np.savez(out, unavailable=np.array(native.status().reason))
        return
    import llama_cpp as lc

    from loramux.base_model import default_base_model
    from loramux.llama_runtime import silence_llama_log

    silence_llama_log(errors_to_stderr=True)
    model = lc.llama_model_load_from_file(str(default_base_model()).encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    prompts = [_tokenize(lc, vocab, p) for p in PROMPTS[: len(CALS)]]
    arrays: dict[str, np.ndarray] = {}
    _routing_pool(lc, model, pool_dir, prompts, arrays)
    _synthetic_pool(lc, model, synth_dir, prompts[0], arrays)
    _device_form_refusals(lc, model, synth_dir, arrays)
    np.savez(out, **arrays)


# ---------------------------------------------------------------- numpy oracle --
def logo_route(x: np.ndarray, factors, cal: str, k: int):
    """numpy's LoGo of each row of x: (dense weights (n, E) in factor order, term (n, out), sorted scores)."""
    xs = x.astype(np.float64)
    facs = list(factors.values())
    scores = np.empty((xs.shape[0], len(facs)))
    for e, (a, b, scale) in enumerate(facs):
        delta = scale * b @ a
        c = {"none": 1.0, "spectral": np.linalg.norm(delta, 2), "frobenius": np.linalg.norm(delta)}[cal]
        scores[:, e] = np.linalg.norm(xs @ delta.T, axis=1) / c if c > 0 else 0.0
    k = min(k, len(facs))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    dense = np.zeros_like(scores)
    np.put_along_axis(dense, order, top / top.sum(axis=1, keepdims=True), axis=1)
    term = np.zeros((xs.shape[0], facs[0][1].shape[0]))
    for e, (a, b, scale) in enumerate(facs):
        term += dense[:, e : e + 1] * (scale * (xs @ a.T) @ b.T)
    return dense, term, -np.sort(-scores, axis=1)


def recorded_weights(data: dict, module: str, seq: int, names: list[str], prefix: str = "rec") -> np.ndarray:
    """The record's weights of ``module`` for sequence ``seq``, dense (rows in position order, columns ``names``)."""
    mine = (data[f"{prefix}_module"] == module) & (data[f"{prefix}_key"][:, 0] == seq)
    keys = data[f"{prefix}_key"][mine]
    dense = np.zeros((int(mine.sum()), len(names)))
    for r, (ids, w) in enumerate(zip(data[f"{prefix}_ids"][mine], data[f"{prefix}_w"][mine])):
        for j, name in enumerate(ids.split(",")):
            dense[r, names.index(name)] = w[j]
    return dense[np.argsort(keys[:, 1], kind="stable")]


def _x_of(data: dict, module: str) -> np.ndarray:
    return data[f"{module}|op|x"]


def _compare(data: dict, pool_dir: Path, module: str, seq: int, *, wrong_scale: bool = False, wrong_layer: bool = False):
    """(max |recorded - numpy| weight over the untied rows, those rows' term rel. errors, untied share) for one
    module and sequence; ``wrong_*``: numpy with the rsLoRA adapter at alpha/r, or on another layer's x."""
    rows = data["rows_seq"] == seq
    factors = lora_factors(pool_dir, module)
    got_w = recorded_weights(data, module, seq, list(factors))
    assert len(got_w) == rows.sum(), f"{module}: {len(got_w)} record rows for sequence {seq}, {rows.sum()} tokens"
    want_w, want_term, sorted_scores = logo_route(_x_of(data, module)[rows], factors, CALS[seq], K)
    well_defined = untied(sorted_scores, min(K, len(factors)))
    if wrong_scale or wrong_layer:
        if wrong_scale:
            a, b, scale = factors[RSLORA]
            factors = factors | {RSLORA: (a, b, scale / np.sqrt(a.shape[0]))}  # alpha/r, not alpha/sqrt(r)
        x = _x_of(data, OTHER_LAYER[module.split(".attn")[0]] if wrong_layer else module)[rows]
        want_w, want_term, _ = logo_route(x, factors, CALS[seq], K)
    term = data[f"{module}|op|term"][rows]
    err_w = np.abs(got_w - want_w)[well_defined].max(initial=0.0)
    return err_w, rel_errors(term[well_defined], want_term[well_defined]), well_defined.mean()


# ---------------------------------------------------------------- tests --
@pytest.fixture(scope="module")
def synth_dir(pool_dir, tmp_path_factory) -> Path:
    """small, big (B x10) and zero (B = 0): two real modules of one fixture, f32."""
    out = tmp_path_factory.mktemp("logo_synth")
    for name, factor in zip(SYNTH, (1.0, 10.0, 0.0)):

        def edit(modules, factor=factor):
            kept = {m: (a, b * np.float32(factor)) for m, (a, b) in modules.items() if m in SYNTH_MODULES}
            assert sorted(kept) == sorted(SYNTH_MODULES), f"the source adapter lacks {SYNTH_MODULES}"
            modules.clear()
            modules.update(kept)

        write_adapter_variant(pool_dir / "boolean_expressions.gguf", out / f"{name}.gguf", edit)
    return out


@pytest.fixture(scope="module")
def captured(pool_dir, synth_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("logo") / "capture.npz"
    run_worker(__file__, out, pool_dir, synth_dir)
    data = dict(np.load(out))
    if "unavailable" in data:
        native_missing(str(data["unavailable"]))
    assert str(data["errors"][0]) == "", f"the callback failed: {data['errors']}"
    return data


def test_get_routing_returns_the_logo_modes(captured):
    assert [str(r) for r in captured["get_routing"]] == [repr((NATIVE[c], K, 0.0)) for c in CALS]


@pytest.mark.parametrize("seq", range(len(CALS)), ids=CALS)
def test_recorded_logo_weights_equal_numpys_on_the_captured_inputs(captured, pool_dir, seq):
    n_checked = 0
    for module in MODULES:
        err_w, err_term, untied_share = _compare(captured, pool_dir, module, seq)
        print(f"cal={CALS[seq]} {module}: max weight error {err_w:.2e}, max term rel error {err_term.max():.2e}, {untied_share:.0%} untied")
        assert untied_share >= 0.8, f"{module}: too many near-ties for the check to mean much"
        assert err_w <= LOGO_WEIGHT_ATOL, f"cal={CALS[seq]} {module}: weight error {err_w:.2e} > {LOGO_WEIGHT_ATOL:.0e}"
        assert err_term.max() <= KERNEL_REL_TOL["fused"], f"cal={CALS[seq]} {module}: term error {err_term.max():.2e}"
        n_checked += len(err_term)
    assert n_checked >= 30


@pytest.mark.parametrize("wrong", ["rsLoRA at alpha/r", "another layer's x"])
def test_a_wrong_scale_or_layer_is_caught(captured, pool_dir, wrong):
    # a wrong scale changes the raw scores only (calibrated scores are scale-free: test_calibration_...);
    # the rsLoRA adapter adapts q and v
    seqs, modules = ([0], MODULES[:3]) if wrong.startswith("rsLoRA") else (range(len(CALS)), MODULES)
    caught = {}
    for seq in seqs:
        for module in modules:
            err_w, err_term, _ = _compare(captured, pool_dir, module, seq, wrong_scale="rsLoRA" in wrong, wrong_layer="layer" in wrong)
            caught[f"{CALS[seq]} {module}"] = (err_w, float(np.median(err_term)))
    print(f"{wrong}: (max weight error, median term rel error) " + ", ".join(f"{k}: {w:.2e} {t:.2e}" for k, (w, t) in caught.items()))
    assert min(w for w, _ in caught.values()) > 10 * LOGO_WEIGHT_ATOL, f"{wrong} is not told apart: {caught}"


@pytest.mark.parametrize("seq", range(len(CALS)), ids=CALS)
def test_calibration_evens_out_a_10x_scale_and_a_zero_adapter_scores_0(captured, seq):
    want = {"small": 1 / 11, "big": 10 / 11, "zero": 0.0} if CALS[seq] == "none" else {"small": 0.5, "big": 0.5, "zero": 0.0}
    for module in SYNTH_MODULES:
        got = recorded_weights(captured, module, seq, list(SYNTH), prefix="syn")
        assert len(got) > 0 and np.isfinite(got).all(), f"cal={CALS[seq]} {module}: {got}"
        err = np.abs(got - np.array([want[n] for n in SYNTH])).max()
        print(f"cal={CALS[seq]} {module}: {len(got)} tokens, weights {got[0].round(6)}, max error {err:.1e}")
        assert err <= LOGO_WEIGHT_ATOL, f"cal={CALS[seq]} {module}: weights {got[0]} (want {want})"


def test_the_device_form_refuses_logo(captured):
    from loramux.native import _bindings as B

    reason = str(captured["dev_reason"])
    assert int(captured["dev_rc"]) == B.LORAMUX_ERR_BAD_ARG, reason
    assert "LoGo" in reason and "device form" in reason and "sequence 0" in reason, reason
    assert str(captured["dev_after"]) == "None"  # a refused call changes nothing
    assert "LoGo" in str(captured["dev_mixer"]) and "device form" in str(captured["dev_mixer"]), str(captured["dev_mixer"])
    assert str(captured["dev_spectr"]) == repr(("spectr", 2, 0.0))
    engine = str(captured["dev_engine"])
    assert "logo-token:k=2,cal=frobenius" in engine and "device form" in engine and "fused CPU op" in engine, engine


# ---------------------------------------------------------------- the spec, no library --
def test_logo_token_spec_round_trips():
    from loramux.mix import Mix
    from loramux.token_routing import ROUTING_MODES, TokenRouting

    assert "logo-token" in ROUTING_MODES and "logo" not in ROUTING_MODES  # "logo" stays the prompt router
    for spec, k, cal in [
        ("logo-token", 3, "spectral"),  # the default calibration
        ("logo-token:k=2,cal=none", 2, "none"),
        ("logo-token:cal=frobenius", 3, "frobenius"),
    ]:
        mix = Mix.parse(spec)
        routing = mix.token_routing
        assert (routing.mode, routing.k, routing.temperature, routing.calibration) == ("logo-token", k, None, cal)
        assert str(mix) == f"logo-token:k={k},cal={cal}" and Mix.parse(str(mix)) == mix
        assert mix.to_json() == {"mode": "logo-token", "k": k, "temperature": None, "calibration": cal}
        assert Mix.coerce(mix.to_json()) == mix and TokenRouting.from_json(routing.to_json()) == routing
        assert routing.native_args() == (NATIVE[cal], k, 1.0)
    assert Mix.logo_token() == Mix.parse("logo-token") and Mix.logo_token(2, "none") == Mix.parse("logo-token:k=2,cal=none")
    assert Mix.parse("logo-token:cal=spectral") != Mix.parse("logo-token:cal=frobenius")  # K/V is never shared across them
    assert Mix.arrow().to_json() == {"mode": "arrow", "k": 3, "temperature": 1.0}  # unchanged for the other modes
    assert TokenRouting("spectr").calibration is None


@pytest.mark.parametrize(
    "value, why",
    [
        ("logo-token:cal=foo", "calibration cal of logo-token must be one of none, spectral, frobenius, got 'foo'"),
        ("logo-token:cal=", "got ''"),
        ("logo-token:T=0.5", "unknown option 'T=0.5' for logo-token; its options are k=N, cal=none|spectral|frobenius"),
        ("logo-token:k=0", "k of logo-token must be a whole number from 1 to 64"),
        ("logo-token:k=2,k=3", "option k is given twice"),
        ("arrow:cal=none", "unknown option 'cal=none' for arrow"),
        ("logo-token=0.5", "'logo-token' is a routing mode"),
        ({"mode": "logo-token", "temperature": 1.0}, "logo-token takes no temperature"),
        ({"mode": "spectr", "calibration": "spectral"}, "spectr takes no calibration"),
        ({"mode": "logo-token", "cal": "none"}, "unknown key(s) cal; keys are mode, k, temperature, calibration"),
    ],
)
def test_bad_logo_token_options_are_refused_with_the_reason(value, why):
    from loramux.errors import MixError
    from loramux.mix import Mix

    with pytest.raises(MixError) as err:
        Mix.coerce(value)
    assert why in str(err.value)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
