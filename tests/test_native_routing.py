"""Per-token routing in the graph (Arrow, SpectR) checked against numpy on the inputs it really saw.

One real batch of four sequences runs Arrow (k=3, T=1), SpectR (k=4), a fixed mix and the base
model together. A graph evaluation callback reads, for a few adapted weights, the op's input ``x``
and the LoRA term it added; numpy then routes every token itself, from the GGUF files alone:
exact prototypes from the SVD of each adapter's delta ``alpha/r B A``, scores, top-k, weights,
and the term ``sum_e w_e alpha_e/r_e B_e A_e x``. The pool mixes ranks and target modules (the six
r=8 q/k/v/o adapters, a q/v r=8 adapter, a q/v r=16 rsLoRA adapter and an all-seven r=4 adapter),
so q and v are routed among 9 adapters, o among 7 and the FFN weights among 1: only adapters that
adapt a weight take part in its gating.

Negative controls: routing with a wrong k or a wrong temperature in numpy is caught at more than
10x the tolerance. The fused op's record (which adapters each token chose, with what weights) is
compared with numpy's choices (the device form must refuse the record, naming a weight), and the
Arrow prototypes the library computed with numpy's SVD.
Both forms run: the fused CPU op, and the device form (ggml's MoE ops) forced with SeqMixer(device_form=True).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import native_missing, run_worker
from floors import KERNEL_REL_TOL, ROUTE_TIE_MARGIN

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
ARROW_SIX = [
    "boolean_expressions",
    "formal_fallacies",
    "logical_deduction_three_objects",
    "penguins_in_a_table",
    "snarks",
    "tracking_shuffled_objects_three_objects",
]
POOL = ARROW_SIX + ["causal_judgement", "dyck_languages", "hyperbaton"]  # + q/v r8, q/v r16 rsLoRA, all seven r4
ROUTES = [("arrow", 3, 1.0), ("spectr", 4, 0.0), ("fixed", {"snarks": 0.6, "causal_judgement": 0.4}), None]
PROMPTS = [
    "not ( True ) and ( True ) is",
    "Is the following argument deductively valid? All cats are mammals.",
    "Which statement is sarcastic? (A) Great, another Monday (B) Mondays are days",
    "Complete the rest of the sequence: ( [ {",
]
MODULES = ["blk.3.attn_q.weight", "blk.3.attn_v.weight", "blk.17.attn_output.weight", "blk.17.ffn_up.weight"]
FORMS = ("fused", "mul_mat_id")  # SeqMixer(device_form=...): the fused CPU op, or the device form
MAX_ACTIVE = 4


# ---------------------------------------------------------------- worker (subprocess) --
def _read(get, ptr: int, n_rows: int) -> np.ndarray:
    from loramux.probe import _GgmlTensor as T

    t = T.from_address(ptr)
    out = np.empty(int(np.prod(list(t.ne))), dtype=np.float32)
    get(ptr, out.ctypes.data, 0, out.nbytes)
    return out.reshape(n_rows, -1)


def _tokenize(lc, vocab, text: str) -> list[int]:
    buf = (lc.llama_token * 256)()
    n = lc.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 256, True, False)
    return list(buf[:n])


def _op_name(t) -> str:
    """The tensor's name; the fused op (renamed by the model's graph, e.g. Qcur-3) by its stacked A ("mux.<weight>.a")."""
    from loramux.probe import _GgmlTensor as T

    if t.src[2] and t.src[6] and not t.src[7]:
        a = T.from_address(t.src[2]).name.decode()
        if a.startswith("mux.") and a.endswith(".a"):
            return f"mux_lora-{a[4:-2]}"
    return t.name.decode()


def _wanted(form: str) -> dict[str, tuple[str, str]]:
    """graph tensor name -> (module, what): the fused op's output, or the device form's routed x and u."""
    if form == "fused":
        return {f"mux_lora-{m}": (m, "op") for m in MODULES}
    return {f"mux_route_x-{m}": (m, "x") for m in MODULES} | {f"mux_route_u-{m}": (m, "u") for m in MODULES}


def _capture(ptr: int, what: str, n_rows: int, get) -> dict[str, np.ndarray]:
    from loramux.probe import _GgmlTensor as T

    if what == "op":  # fused op: srcs res, x (not in place)
        t = T.from_address(ptr)
        res, x = _read(get, t.src[0], n_rows), _read(get, t.src[1], n_rows)
        return {"x": x, "term": _read(get, ptr, n_rows) - res}
    if what == "x":
        return {"x": _read(get, ptr, n_rows)}
    ne = T.from_address(ptr).ne  # u [n_out, k, nt]: the routed pass's term, summed over its slots
    return {"term": _read(get, ptr, n_rows).reshape(n_rows, ne[1], ne[0]).sum(axis=1)}


def _set_routes(mixer) -> None:
    for s, route in enumerate(ROUTES):
        if route is None:
            mixer.clear(s)
        elif route[0] == "fixed":
            mixer.set(s, route[1])
        else:
            mixer.set_routing(s, route[0], route[1], route[2] or 1.0)


def capture_callback(wanted: dict[str, tuple[str, str]], n_rows: int, got: dict[str, np.ndarray], errors: list[str]):
    """A ggml eval callback that stores, once each, the ``wanted`` tensors of ``n_rows`` rows into ``got``
    (``"module|what|key"``: the fused op's x and term, or the device form's routed x and u) and its own
    exceptions into ``errors``."""
    import llama_cpp as lc

    from loramux.probe import _GgmlTensor, _tensor_get_function

    get = _tensor_get_function()

    def on_tensor(ptr, ask, _user):
        try:
            t = _GgmlTensor.from_address(ptr)
            name = _op_name(t)
            rows = t.ne[2] if name.startswith("mux_route_u") else t.ne[1]
            first = name in wanted and rows == n_rows and not any(k.startswith("|".join(wanted[name]) + "|") for k in got)
            if ask:
                return first
            if first:
                module, what = wanted[name]
                for key, arr in _capture(ptr, what, n_rows, get).items():
                    got[f"{module}|{what}|{key}"] = arr
        except BaseException as exc:  # never unwind through llama.cpp
            errors.append(repr(exc))
        return True

    return lc.ggml_backend_sched_eval_callback(on_tensor)


def prompt_rows(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, position) of every token row of one batch holding ``prompts`` (sequence s = prompt s)."""
    rows_seq = np.array([s for s, p in enumerate(prompts) for _ in p], dtype=np.int32)
    rows_pos = np.array([i for p in prompts for i in range(len(p))], dtype=np.int32)
    return rows_seq, rows_pos


def decode_prompts(ctx, prompts: list[list[int]]) -> None:
    """Decode ``prompts`` in one batch, sequence s = prompt s (rows as :func:`prompt_rows`)."""
    from loramux.llama_batch import TokenBatch

    rows_seq, rows_pos = prompt_rows(prompts)
    batch = TokenBatch(len(rows_seq))
    batch.set(
        [prompts[s][i] for s, i in zip(rows_seq, rows_pos)],
        rows_pos,
        rows_seq,
        [i == len(prompts[s]) - 1 for s, i in zip(rows_seq, rows_pos)],
    )
    batch.decode(ctx)


def _worker_capture(out: Path, adapter_dir: Path, form: str) -> None:
    import llama_cpp as lc

    from loramux.base_model import default_base_model
    from loramux.llama_batch import new_context
    from loramux.native.mixer import SeqMixer

    model = lc.llama_model_load_from_file(str(default_base_model()).encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    adapters = {n: lc.llama_adapter_lora_init(model, str(adapter_dir / f"{n}.gguf").encode()) for n in POOL}
    prompts = [_tokenize(lc, vocab, p) for p in PROMPTS]
    rows_seq, rows_pos = prompt_rows(prompts)
    got: dict[str, np.ndarray] = {}
    errors: list[str] = []
    callback = capture_callback(_wanted(form), len(rows_seq), got, errors)
    ctx = new_context(model, n_ctx=1024, n_seq_max=4, n_threads=1, kv_unified=True, cb_eval=callback)
    mixer = SeqMixer(ctx, adapters, max_active=MAX_ACTIVE, device_form=form == "mul_mat_id")
    _set_routes(mixer)
    refusal = _start_record(mixer)
    decode_prompts(ctx, prompts)
    arrays = {"rows_seq": rows_seq, "rows_pos": rows_pos, "errors": np.array(errors or [""]), "record_refusal": np.array(refusal)} | got
    if not refusal:
        _save_record(arrays, mixer)
    for m in MODULES:
        names, protos = mixer.prototypes(m)
        arrays[f"proto:{m}"], arrays[f"proto_names:{m}"] = protos, np.array(names)
    np.savez(out, **arrays)


def _start_record(mixer) -> str:
    """Turn the record on; the refusal's text where the pool refuses it (the device form), else ""."""
    from loramux.errors import LoramuxError

    try:
        mixer.record(True)
    except LoramuxError as exc:
        return str(exc)
    return ""


def _save_record(arrays: dict, mixer, modules=MODULES, prefix: str = "rec") -> None:
    """The record's rows of ``modules`` (all when None) into ``arrays`` as PREFIX_module, _key, _ids, _w."""
    rows = [c for c in mixer.take_choices() if modules is None or c.module in modules]
    width = mixer.max_active
    arrays[f"{prefix}_module"] = np.array([c.module for c in rows])
    arrays[f"{prefix}_key"] = np.array([[c.seq_id, c.pos] for c in rows], dtype=np.int32).reshape(-1, 2)
    arrays[f"{prefix}_ids"] = np.array([",".join(c.adapters) for c in rows])
    arrays[f"{prefix}_w"] = np.array([list(c.weights) + [0.0] * (width - len(c.weights)) for c in rows], dtype=np.float64).reshape(
        -1, width
    )


def _worker(out: Path, adapter_dir: Path, form: str) -> None:
    from loramux import native

    if not native.available():
        np.savez(out, unavailable=np.array(native.status().reason))
        return
    from loramux.llama_runtime import silence_llama_log

    silence_llama_log(errors_to_stderr=True)
    _worker_capture(out, adapter_dir, form)


# ---------------------------------------------------------------- numpy oracle --
def lora_factors(pool_dir: Path, module: str, names=POOL) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per adapter that adapts ``module``, in pool order: A (r, in), B (out, r), alpha / r."""
    import gguf

    factors = {}
    for name in names:
        reader = gguf.GGUFReader(pool_dir / f"{name}.gguf")
        tensors = {t.name: t for t in reader.tensors}
        if f"{module}.lora_a" not in tensors:
            continue
        a = np.array(tensors[f"{module}.lora_a"].data, dtype=np.float64)
        b = np.array(tensors[f"{module}.lora_b"].data, dtype=np.float64)
        alpha = float(reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents())
        factors[name] = (a, b, alpha / a.shape[0] if alpha else 1.0)
    return factors


def exact_gates(factors) -> tuple[np.ndarray, list[np.ndarray]]:
    """Arrow prototypes (E, in) and SpectR bases (each (in, r)) from the SVD of every delta."""
    protos, bases = [], []
    for a, b, scale in factors.values():
        _, s, vt = np.linalg.svd(scale * b @ a, full_matrices=False)
        protos.append(vt[0])
        bases.append(vt[: int((s > 1e-9 * s[0]).sum())].T)
    return np.array(protos), bases


def route_rows(x: np.ndarray, factors, mode: str, k: int, temperature: float):
    """numpy's routing of each row of x: (term, chosen indices (n, k'), weights (n, k'), sorted scores)."""
    protos, bases = exact_gates(factors)
    xs = x.astype(np.float64)
    if mode == "arrow":
        scores = np.abs(xs @ protos.T)
    else:  # SpectR per rank: ||Q_e^T x|| / sqrt(r_e) ("spectr-plain": the reference's ||Q_e^T x||, a control)
        ranks = [a.shape[0] if mode == "spectr" else 1 for a, _, _ in factors.values()]
        scores = np.stack([np.linalg.norm(xs @ q, axis=1) / np.sqrt(r) for q, r in zip(bases, ranks)], axis=1)
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    w = np.exp((top - top[:, :1]) / temperature) if mode == "arrow" else np.ones_like(top)
    w /= w.sum(axis=1, keepdims=True)
    facs = list(factors.values())
    term = np.zeros((x.shape[0], facs[0][1].shape[0]))
    for r in range(x.shape[0]):
        for j, e in enumerate(order[r]):
            a, b, scale = facs[e]
            term[r] += w[r, j] * scale * (b @ (a @ xs[r]))
    return term, order, w, -np.sort(-scores, axis=1)


def untied(sorted_scores: np.ndarray, k: int) -> np.ndarray:
    """Rows whose k-th and (k+1)-th scores differ by more than the tie margin (the choice is well defined)."""
    if sorted_scores.shape[1] <= k:
        return np.ones(sorted_scores.shape[0], dtype=bool)
    gap = sorted_scores[:, k - 1] - sorted_scores[:, k]
    return gap > ROUTE_TIE_MARGIN * np.maximum(sorted_scores[:, 0], 1e-30)


def rel_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-30)


# ---------------------------------------------------------------- tests --
@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory, base_model, shared_dir) -> Path:
    from loramux.converters import convert_peft_to_gguf

    out = tmp_path_factory.mktemp("routing_pool")
    for name in POOL:
        convert_peft_to_gguf(FIXTURES / name, base_model, out / f"{name}.gguf", outtype="f16")
    return out


@pytest.fixture(scope="module", params=list(FORMS))
def captured(request, pool_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"route-{request.param}") / "capture.npz"
    run_worker(__file__, out, pool_dir, request.param)
    data = dict(np.load(out))
    if "unavailable" in data:
        native_missing(str(data["unavailable"]))
    assert str(data["errors"][0]) == "", f"the callback failed: {data['errors']}"
    return request.param, data


def _routed(data, pool_dir, module: str, seq: int, k: int, temperature: float, mode: str):
    x, term = _term_of(data, module)
    rows = data["rows_seq"] == seq
    factors = lora_factors(pool_dir, module)
    want, order, w, sorted_scores = route_rows(x[rows], factors, mode, k, temperature or 1.0)
    return term[rows], want, order, w, untied(sorted_scores, min(k, len(factors))), factors


def _term_of(data: dict, module: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, LoRA term) of one module: the fused op's, or the device form's routed pass."""
    if f"{module}|op|x" in data:
        return data[f"{module}|op|x"], data[f"{module}|op|term"]
    assert f"{module}|x|x" in data and f"{module}|u|term" in data, f"{module}: the routed pass was not captured ({sorted(data)})"
    return data[f"{module}|x|x"], data[f"{module}|u|term"]


@pytest.mark.parametrize("seq", [0, 1], ids=["arrow", "spectr"])
def test_routed_tokens_equal_numpy_routing_on_their_own_inputs(captured, pool_dir, seq):
    form, data = captured
    mode, k, temperature = ROUTES[seq]
    n_checked = 0
    for module in MODULES:
        got, want, _, _, well_defined, factors = _routed(data, pool_dir, module, seq, k, temperature, mode)
        err = rel_errors(got[well_defined], want[well_defined])
        print(
            f"{form} {mode} {module} ({len(factors)} adapters): max rel error {err.max():.2e}, {well_defined.sum()}/{len(got)} rows untied"
        )
        assert well_defined.mean() >= 0.8, f"{module}: too many near-ties ({(~well_defined).sum()} rows) for the check to mean much"
        assert err.max() <= KERNEL_REL_TOL[form], f"{form} {mode} {module}: relative error {err.max():.2e} > {KERNEL_REL_TOL[form]:.0e}"
        n_checked += int(well_defined.sum())
    assert n_checked >= 30


WRONG = {  # what numpy routes instead: (sequence, mode, k, temperature)
    "k=2": (0, "arrow", 2, 1.0),
    "T=0.5": (0, "arrow", 3, 0.5),
    "arrow as spectr": (0, "spectr", 3, 1.0),
    "spectr not per rank": (1, "spectr-plain", 4, 1.0),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_wrong_k_temperature_or_score_is_caught(captured, pool_dir, wrong):
    form, data = captured
    seq, mode, k, temperature = WRONG[wrong]
    caught = []
    # q and v are routed among 9 adapters of ranks 4, 8 and 16, o among 7 (six of rank 8, where the
    # per-rank score only rescales the one r=4 adapter and the top 4 need not change)
    modules = MODULES[:2] if mode == "spectr-plain" else MODULES[:3]
    for module in modules:
        got, want, _, _, _, _ = _routed(data, pool_dir, module, seq, k, temperature, mode)
        caught.append(np.median(rel_errors(got, want)))
    print(f"{form} {wrong}: median relative errors {['%.2e' % c for c in caught]}")
    assert min(caught) > 10 * KERNEL_REL_TOL[form], f"{form}: routing with {wrong} is not told apart ({caught})"


def test_fixed_and_base_rows_are_untouched_by_routing(captured, pool_dir):
    form, data = captured
    rows_seq = data["rows_seq"]
    for module in MODULES:
        x, term = _term_of(data, module)
        if form == "fused":
            assert np.all(term[rows_seq == 3] == 0), f"{module}: the base sequence got a LoRA term"
            factors = lora_factors(pool_dir, module)
            want = np.zeros_like(term[rows_seq == 2], dtype=np.float64)
            for name, w in ROUTES[2][1].items():
                if name in factors:
                    a, b, scale = factors[name]
                    want += w * scale * (x[rows_seq == 2].astype(np.float64) @ a.T @ b.T)
            assert rel_errors(term[rows_seq == 2], want).max() <= KERNEL_REL_TOL[form]
        else:  # the routed pass adds exactly 0 for the fixed and base rows
            assert np.all(term[rows_seq >= 2] == 0), f"{module}: the routed pass touched a fixed or base row"


def test_the_record_names_numpys_choices(captured, pool_dir):
    form, data = captured
    refusal = str(data["record_refusal"])
    if form != "fused":  # the device form keeps no record, and says so naming a weight
        assert "weight 'blk." in refusal and "device form" in refusal, f"the device form did not refuse the record: {refusal!r}"
        return
    assert refusal == "", f"the fused op refused the record: {refusal}"
    for seq in (0, 1):
        mode, k, temperature = ROUTES[seq]
        for module in MODULES:
            _, _, order, w, well_defined, factors = _routed(data, pool_dir, module, seq, k, temperature, mode)
            names = list(factors)
            mine = (data["rec_module"] == module) & (data["rec_key"][:, 0] == seq)
            assert mine.sum() == (data["rows_seq"] == seq).sum(), f"{module}: {mine.sum()} record rows for sequence {seq}"
            pos = data["rec_key"][mine, 1]
            assert np.array_equal(pos, np.sort(pos))
            for r in np.flatnonzero(well_defined):
                got = data["rec_ids"][mine][r].split(",")
                assert sorted(got) == sorted(names[e] for e in order[r]), f"{mode} {module} token {r}: {got}"
                assert np.allclose(np.sort(data["rec_w"][mine][r][: len(got)]), np.sort(w[r]), atol=1e-4)


def test_the_prototypes_are_the_exact_top_singular_vectors(captured, pool_dir):
    _, data = captured
    for module in MODULES:
        factors = lora_factors(pool_dir, module)
        assert list(data[f"proto_names:{module}"]) == list(factors)
        protos, _ = exact_gates(factors)
        cos = np.abs(np.sum(protos * data[f"proto:{module}"], axis=1))
        assert cos.min() >= 1 - 1e-5, f"{module}: prototype cosines {cos}"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
