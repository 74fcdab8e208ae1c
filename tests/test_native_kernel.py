"""The per-sequence mix op checked against numpy on the inputs it really saw, in both forms.

The batch-vs-alone oracle of tests/test_native_oracle.py can only tell errors above llama.cpp's
batch floor (a 1.5x scale). This module looks at the op itself: a graph evaluation callback
reads, for a few adapted weights of a real mixed batch, the op's input ``x`` and the LoRA term it
added, and numpy recomputes ``sum_j w_j (alpha_j / r_j) B_j A_j x`` per token from the GGUF files
and each token's sequence mix. That comparison has no batch floor: it catches a 10% scale error
on one adapter, or an adapter dropped at weight 0.3 (negative controls below).

Both forms run: the fused CPU op (host buffers) and the ``ggml_mul_mat_id`` form that device
buffers (CUDA) use, forced on the CPU with ``SeqMixer(device_form=True)``. The Inf case shows that an
adapter whose output is Inf for a token leaves every other sequence of the batch bitwise as it
was (empty slots select an all-zero slice, so the device form never computes 0 * Inf).

Workers run in subprocesses (loramux.native must load the patched libllama before llama_cpp).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import native_missing, run_worker, write_adapter_variant
from floors import KERNEL_REL_TOL

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
# q/k/v/o r8, q/v r8, all-seven r4 (two), rsLoRA r16 q/v, rank/alpha patterns
POOL = ["boolean_expressions", "causal_judgement", "hyperbaton", "navigate", "dyck_languages", "object_counting"]
MIXES = [
    {"boolean_expressions": 1.0},
    {"hyperbaton": 0.7, "navigate": 0.3},
    None,
    {"dyck_languages": 0.5, "object_counting": -0.4, "causal_judgement": 1.2},
]
PROMPTS = [
    "not ( True ) and ( True ) is",
    "Which sentence has the correct adjective order?",
    "Sort the following words alphabetically: List: oven costume",
    "How many objects do I have? I have a piano, a flute, and a trombone.",
]
LAYERS = (3, 17)
MODULES = {"Vcur": "attn_v", "ffn_up": "ffn_up"}  # graph name -> GGUF module
FORMS = ("fused", "mul_mat_id")  # SeqMixer(device_form=...): the fused CPU op, or the device form
INF_TENSOR = "blk.29.ffn_up.weight"  # last layer's FFN: only output rows, never the K/V


# ---------------------------------------------------------------- worker (subprocess) --
def _read_f32(get, ptr: int, t, n_rows: int) -> np.ndarray:
    n = int(t.ne[0]) * int(t.ne[1]) * int(t.ne[2]) * int(t.ne[3])
    out = np.empty(n, dtype=np.float32)
    get(ptr, out.ctypes.data, 0, out.nbytes)
    return out.reshape(n_rows, -1)


def _op_parts(ptr: int, k: int, n_rows: int, get) -> tuple[np.ndarray, np.ndarray]:
    """(x, LoRA term) of the mix op whose output is the tensor at ``ptr``."""
    from loramux.probe import _GgmlTensor as T

    t = T.from_address(ptr)
    if t.src[4]:  # the fused op: srcs res, x, A, B, ids, w (not in place: res is intact)
        res = _read_f32(get, t.src[0], T.from_address(t.src[0]), n_rows)
        x = _read_f32(get, t.src[1], T.from_address(t.src[1]), n_rows)
        return x, _read_f32(get, ptr, t, n_rows) - res
    # mul_mat_id form: res + view(u, slot 0) + ... + view(u, slot k-1), adds in place over res,
    # so the term is read from u = mul_mat_id(B, mul(mul_mat_id(A, x, ids), w), ids)
    view = T.from_address(t.src[1])
    u_ptr = view.view_src
    u = T.from_address(u_ptr)
    mm_a = T.from_address(T.from_address(u.src[1]).src[0])
    x = _read_f32(get, mm_a.src[1], T.from_address(mm_a.src[1]), n_rows)
    term = _read_f32(get, u_ptr, u, n_rows).reshape(n_rows, k, -1).sum(axis=1)
    return x, term


def _tokenize(lc, vocab, text: str) -> list[int]:
    buf = (lc.llama_token * 256)()
    n = lc.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 256, True, False)
    return list(buf[:n])


def _worker_capture(out: Path, adapter_dir: Path, form: str) -> None:
    import llama_cpp as lc

    from loramux.base_model import default_base_model
    from loramux.llama_batch import TokenBatch, new_context
    from loramux.native.mixer import SeqMixer
    from loramux.probe import _GgmlTensor, _tensor_get_function

    model = lc.llama_model_load_from_file(str(default_base_model()).encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    adapters = {n: lc.llama_adapter_lora_init(model, str(adapter_dir / f"{n}.gguf").encode()) for n in POOL}
    prompts = [_tokenize(lc, vocab, p) for p in PROMPTS]
    rows_seq = np.array([s for s, p in enumerate(prompts) for _ in p], dtype=np.int32)
    want = {f"{g}-{il}" for g in MODULES for il in LAYERS}
    got: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[str] = []
    get = _tensor_get_function()
    n_rows = len(rows_seq)

    def on_tensor(ptr, ask, _user):
        try:
            t = _GgmlTensor.from_address(ptr)
            name = t.name.decode()
            first = name in want and name not in got and t.ne[1] == n_rows and t.ne[2] == 1
            if ask:
                return first
            if first:
                got[name] = _op_parts(ptr, 3, n_rows, get)
        except BaseException as exc:  # never unwind through llama.cpp
            errors.append(repr(exc))
        return True

    callback = lc.ggml_backend_sched_eval_callback(on_tensor)
    ctx = new_context(model, n_ctx=1024, n_seq_max=4, n_threads=1, kv_unified=True, cb_eval=callback)
    mixer = SeqMixer(ctx, adapters, max_active=3, device_form=form == "mul_mat_id")
    for s, mix in enumerate(MIXES):
        mixer.set(s, mix)
    batch = TokenBatch(n_rows)
    rows = [(tok, i, s, i == len(toks) - 1) for s, toks in enumerate(prompts) for i, tok in enumerate(toks)]
    batch.set(*map(list, zip(*rows)))
    batch.decode(ctx)
    arrays = {"rows_seq": rows_seq, "errors": np.array(errors or [""])}
    for name, (x, term) in got.items():
        arrays[f"x:{name}"], arrays[f"term:{name}"] = x, term
    np.savez(out, **arrays)


def _inf_adapter(adapter_dir: Path, out: Path) -> Path:
    """navigate with one lora_a of the last layer's FFN at 1e38 (finite in f32, Inf once stacked in f16)."""

    def set_inf(modules) -> None:
        a, b = modules[INF_TENSOR]
        modules[INF_TENSOR] = (np.full_like(a, 1e38), b)

    return write_adapter_variant(adapter_dir / "navigate.gguf", out, set_inf)


def _worker_inf(out: Path, adapter_dir: Path, form: str) -> None:
    import llama_cpp as lc

    from loramux.base_model import default_base_model
    from loramux.native import teacher
    from loramux.native.mixer import SeqMixer

    model = lc.llama_model_load_from_file(str(default_base_model()).encode(), lc.llama_model_default_params())
    vocab = lc.llama_model_get_vocab(model)
    files = {"inf": _inf_adapter(adapter_dir, out.with_suffix(".gguf"))} | {n: adapter_dir / f"{n}.gguf" for n in POOL}
    adapters = {n: lc.llama_adapter_lora_init(model, str(f).encode()) for n, f in files.items()}  # "inf" is pool id 0
    ctx = teacher.new_context(model, n_seq_max=4, n_ctx=1024, n_threads=1)
    mixer = SeqMixer(ctx, adapters, max_active=3, device_form=form == "mul_mat_id")
    seqs = [teacher.ForcedSequence(_tokenize(lc, vocab, p), [28, 29, 30]) for p in PROMPTS]
    mixes = [{"inf": 1.0}, {"hyperbaton": 1.0}, None, {"boolean_expressions": 1.0}]
    runs = {}
    for label, first in (("with_inf", mixes[0]), ("without", None)):
        for s, mix in enumerate([first] + mixes[1:]):
            mixer.set(s, mix)
        runs.update({f"{label}_{s}": g for s, g in enumerate(teacher.decode_forced(ctx, seqs))})
    np.savez(out, **runs)


def _worker(case: str, out: Path, adapter_dir: Path, form: str) -> None:
    from loramux import native

    if not native.available():
        np.savez(out, unavailable=np.array(native.status().reason))
        return
    from loramux.llama_runtime import silence_llama_log

    silence_llama_log(errors_to_stderr=True)
    {"capture": _worker_capture, "inf": _worker_inf}[case](out, adapter_dir, form)


# ---------------------------------------------------------------- tests --
@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory, base_model, shared_dir) -> Path:
    from loramux.converters import convert_peft_to_gguf

    out = tmp_path_factory.mktemp("kernel_pool")
    for name in POOL:
        convert_peft_to_gguf(FIXTURES / name, base_model, out / f"{name}.gguf", outtype="f16")
    return out


def _run(case: str, form: str, pool_dir: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{case}-{form}.npz"
    run_worker(__file__, case, out, pool_dir, form)
    data = dict(np.load(out))
    if "unavailable" in data:
        native_missing(str(data["unavailable"]))
    return data


def _lora_factors(pool_dir: Path, module: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per adapter that adapts ``module`` (e.g. blk.3.attn_v.weight): A (r, in), B (out, r), alpha / r."""
    import gguf

    factors = {}
    for name in POOL:
        reader = gguf.GGUFReader(pool_dir / f"{name}.gguf")
        tensors = {t.name: t for t in reader.tensors}
        if f"{module}.lora_a" not in tensors:
            continue
        a = np.array(tensors[f"{module}.lora_a"].data, dtype=np.float64)
        b = np.array(tensors[f"{module}.lora_b"].data, dtype=np.float64)
        alpha = float(reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents())
        factors[name] = (a, b, alpha / a.shape[0] if alpha else 1.0)
    return factors


def _expected(x: np.ndarray, rows_seq: np.ndarray, mixes, factors) -> np.ndarray:
    out = np.zeros((x.shape[0], next(iter(factors.values()))[1].shape[0]))
    for r, s in enumerate(rows_seq):
        for name, w in (mixes[s] or {}).items():
            if name in factors:
                a, b, scale = factors[name]
                out[r] += w * scale * (b @ (a @ x[r].astype(np.float64)))
    return out


def _rel_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-30)


@pytest.fixture(scope="module", params=list(FORMS))
def captured(request, pool_dir, tmp_path_factory):
    data = _run("capture", request.param, pool_dir, tmp_path_factory.mktemp(f"capture-{request.param}"))
    assert str(data["errors"][0]) == "", f"the callback failed: {data['errors']}"
    return request.param, data


def _cases(data: dict):
    names = sorted(k[2:] for k in data if k.startswith("x:"))
    assert len(names) == len(MODULES) * len(LAYERS), f"captured {names}, expected every module of layers {LAYERS}"
    for name in names:
        graph, layer = name.rsplit("-", 1)
        yield name, f"blk.{layer}.{MODULES[graph]}.weight"


def test_the_mix_op_equals_numpy_on_its_own_inputs(captured, pool_dir):
    form, data = captured
    rows_seq, base_seq = data["rows_seq"], MIXES.index(None)
    for name, module in _cases(data):
        factors = _lora_factors(pool_dir, module)
        got, want = data[f"term:{name}"], _expected(data[f"x:{name}"], rows_seq, MIXES, factors)
        assert np.all(got[rows_seq == base_seq] == 0), f"{form} {name}: a sequence without a mix got a LoRA term"
        mixed = rows_seq != base_seq
        err = _rel_errors(got[mixed], want[mixed])
        print(f"{form} {name}: max relative error {err.max():.2e} over {mixed.sum()} rows")
        assert err.max() <= KERNEL_REL_TOL[form], f"{form} {name}: relative error {err.max():.2e} > {KERNEL_REL_TOL[form]:.0e}"


def _wrong_mixes(case: str):
    mixes = [dict(m) if m else None for m in MIXES]
    if case == "scale_10pct":
        mixes[0] = {"boolean_expressions": 1.1}
    else:  # an adapter dropped from its mix at weight 0.3
        mixes[1] = {"hyperbaton": 0.7}
    return mixes


@pytest.mark.parametrize("case", ["scale_10pct", "dropped_at_0.3"])
def test_small_errors_are_caught_by_the_kernel_tolerance(captured, pool_dir, case):
    form, data = captured
    rows_seq = data["rows_seq"]
    seq = 0 if case == "scale_10pct" else 1
    n_compared = 0
    for name, module in _cases(data):
        factors = _lora_factors(pool_dir, module)
        if not set(_wrong_mixes(case)[seq]) & set(factors):
            continue
        want = _expected(data[f"x:{name}"], rows_seq, _wrong_mixes(case), factors)
        rows = rows_seq == seq
        err = _rel_errors(data[f"term:{name}"][rows], want[rows])
        assert err.min() > 10 * KERNEL_REL_TOL[form], f"{form} {name}: {case} not caught (relative error {err.min():.2e})"
        n_compared += 1
    assert n_compared >= 2, f"{case}: only {n_compared} modules compared"


@pytest.mark.parametrize("form", list(FORMS))
def test_an_inf_adapter_leaves_the_other_sequences_bitwise_clean(form, pool_dir, tmp_path):
    data = _run("inf", form, pool_dir, tmp_path)
    assert not np.isfinite(data["with_inf_0"]).all(), "the Inf adapter did not produce a non-finite output: the test says nothing"
    assert np.isfinite(data["without_0"]).all()
    for s in range(1, len(MIXES)):
        assert np.isfinite(data[f"with_inf_{s}"]).all(), f"{form}: sequence {s} got NaN/Inf from another sequence's adapter"
        assert np.array_equal(data[f"with_inf_{s}"], data[f"without_{s}"]), f"{form}: sequence {s} moved"


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
