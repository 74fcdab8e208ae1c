"""Oracle tests of the native per-sequence mixes on the real model (CPU).

Each case runs in a fresh subprocess (``python tests/test_native_oracle.py CASE OUT``): loramux.native
must point llama_cpp at the patched libllama before llama_cpp is first imported, and other tests
of the session may already have imported the stock one. The worker writes an .npz; the test
asserts on it.

The oracle is the same request decoded alone with stock ``llama_set_adapters_lora`` at the same
scales (same patched library, no per-sequence mix set), teacher-forced: the same tokens are fed
to both, one token per step (the batch: one llama_decode per step for all sequences).

Tolerance, from the measured floor. Stock llama.cpp is not batch-invariant: one-ulp differences
(another summation order in a batched kernel or over the unified K/V cache, f16 rounding of the
LoRA intermediates) grow through the 30 layers. Measured on this model (f16 adapters, prompts
of ~15 tokens, 8-12 forced steps): stock with the adapter set on the whole context, the same
sequence in a batch of 6 vs alone: max |diff| 1.09, mean |diff| 0.15 (DESIGN.md §9: up to ~0.9
in a batch of 8); the base model with no adapter in a batch vs alone: max 0.78. loramux in a mixed
batch vs stock alone: max 0.78-1.48, mean 0.15-0.23. A wrong scale (1.5x on one adapter): max 6.2,
mean 0.69. Hence:

- ``MAX_ABS_TOL`` = 2.0 on any logit and ``MEAN_ABS_TOL`` = 0.35 over all logits of a sequence
  (tests/floors.py)
  (the negative control, a 1.5x scale, must exceed them: it does, by 3x and 2x);
- greedy tokens are compared only where the oracle's top-two gap exceeds ``MAX_ABS_TOL``;
- where no floor applies, equality is bitwise: a sequence without a mix equals the base model
  computed in the same batch layout without any adapter, and changing one sequence's mix leaves
  every other sequence's logits bitwise unchanged.

Every case runs in both forms of the op. Smaller errors (a 10% scale, an adapter dropped at 0.3)
sit below this floor; tests/test_native_kernel.py catches them on the op's captured inputs.

Skipped when the native library is not built (``scripts/build_native.sh``), unless
``LORAMUX_REQUIRE_NATIVE=1``, which turns the skip into a failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import native_missing, run_worker
from floors import BATCH_MAX_ABS as MAX_ABS_TOL
from floors import BATCH_MEAN_ABS as MEAN_ABS_TOL

# the two forms of the op (SeqMixer(device_form=...) at registration): the fused CPU op of host buffers,
# and ggml_mul_mat_id, the form of device buffers (CUDA), forced on the CPU
FORMS = ("fused", "mul_mat_id")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
# adapters covering every PEFT shape of the fixtures: q/k/v/o r8, q/v r8, all-seven r4, rsLoRA r16, rank/alpha patterns
POOL = [
    "boolean_expressions",
    "causal_judgement",
    "disambiguation_qa",
    "dyck_languages",
    "object_counting",
    "hyperbaton",
    "navigate",
    "snarks",
]
PROMPTS = [
    "not ( True ) and ( True ) is",
    "Which sentence has the correct adjective order?",
    "Sort the following words alphabetically: List: oven costume counterpart",
    "If you follow these instructions, do you return to the starting point?",
    "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input: [ {",
    "How many objects do I have? I have a piano, a flute, and a trombone.",
]
# one mix per sequence: single adapters, pairs, top-3, a negative weight, and no mix (base)
MIXES = [
    {"boolean_expressions": 1.0},
    {"hyperbaton": 0.6, "navigate": 0.4},
    None,
    {"dyck_languages": 0.5, "object_counting": 0.3, "snarks": 0.7},
    {"disambiguation_qa": -0.5, "causal_judgement": 1.2},
    {"navigate": 1.0},
]
N_STEPS = 10
# one adapter per sequence, for the f32-adapter case
SINGLES = [{"boolean_expressions": 1.0}, {"navigate": 0.5}, None, {"object_counting": 1.0}, {"hyperbaton": -1.0}, {"dyck_languages": 1.0}]


# ---------------------------------------------------------------- worker (subprocess) --
def _worker(case: str, out: Path, adapter_dir: Path, form: str) -> None:
    from loramux import native

    if not native.available():
        np.savez(out, unavailable=np.array(native.status().reason))
        return

    from loramux.base_model import default_base_model
    from loramux.native import teacher

    paths = {n: adapter_dir / f"{n}.gguf" for n in POOL}
    with teacher.loaded_model(str(default_base_model()), paths) as (model, adapters):
        res = _decode_case(case, model, adapters, form == "mul_mat_id")
    np.savez(out, **res)


def _decode_case(case: str, model, adapters, device_form: bool) -> dict[str, np.ndarray]:
    """The alone oracle, then ``case`` on one context of 8 sequences (one thread: results do not depend on it)."""
    import llama_cpp

    from loramux.native import teacher
    from loramux.native.mixer import SeqMixer

    vocab = llama_cpp.llama_model_get_vocab(model)

    def tok(text: str) -> list[int]:
        buf = (llama_cpp.llama_token * 256)()
        n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 256, True, False)
        return list(buf[:n])

    prompts = [tok(p) for p in PROMPTS]
    ctx = teacher.new_context(model, n_seq_max=8, n_ctx=8 * 256, n_threads=1)
    res: dict[str, np.ndarray] = {}
    with SeqMixer(ctx, adapters, max_active=3, device_form=device_form) as mixer:
        forced = _alone_oracle(res, ctx, adapters, prompts)
        seqs = [teacher.ForcedSequence(p, f) for p, f in zip(prompts, forced)]
        if case == "mixed":
            _case_mixed(res, model, ctx, mixer, seqs)
        elif case == "exact_f32":
            _case_exact_f32(res, ctx, mixer, adapters, seqs)
        else:
            raise SystemExit(f"unknown case {case}")
    res["forced"] = np.array([f + [-1] * (N_STEPS - len(f)) for f in forced])
    llama_cpp.llama_free(ctx)
    return res


def _stock(adapters, mix) -> list:
    return [(adapters[n], w) for n, w in (mix or {}).items()]


def _alone_oracle(res, ctx, adapters, prompts) -> list[list[int]]:
    """The oracle: each request alone, greedy, with the stock per-context adapters (no per-sequence mix)."""
    from loramux.native import teacher

    forced = []
    for i, (p, mix) in enumerate(zip(prompts, MIXES)):
        teacher.set_stock_adapters(ctx, _stock(adapters, mix))
        toks, logits = teacher.greedy_alone(ctx, p, N_STEPS)
        forced.append(toks)
        res[f"alone_{i}"] = logits
    teacher.set_stock_adapters(ctx, [])
    return forced


def _case_mixed(res, model, ctx, mixer, seqs) -> None:
    """Different mixes in one batch; a mix change on one sequence; a wrong scale; graph reuse across changes."""
    import time

    import llama_cpp

    from loramux.native import teacher

    for i, mix in enumerate(MIXES):
        mixer.set(i, mix)
    perf0 = llama_cpp.llama_perf_context(ctx)
    for i, g in enumerate(teacher.decode_forced(ctx, seqs)):
        res[f"batch_{i}"] = g
    perf1 = llama_cpp.llama_perf_context(ctx)
    # the same batch layout on a context with no pool registered at all: the base model
    plain = teacher.new_context(model, n_seq_max=8, n_ctx=8 * 256, n_threads=1)
    for i, g in enumerate(teacher.decode_forced(plain, seqs)):
        res[f"plain_{i}"] = g
    llama_cpp.llama_free(plain)
    res["reused_in_run"] = np.array(perf1.n_reused - perf0.n_reused)
    # change one sequence's mix: the others must not move
    mixer.set(3, {"boolean_expressions": 0.9})
    for i, g in enumerate(teacher.decode_forced(ctx, seqs)):
        res[f"changed_{i}"] = g
    # negative control: a wrong scale on sequence 0 must fail the tolerance
    mixer.set(0, {"boolean_expressions": 1.5})
    res["wrong_scale_0"] = teacher.decode_forced(ctx, seqs[:1])[0]
    # graph reuse survives mix changes between decode steps
    mixer.set(0, MIXES[0])
    teacher.decode_forced(ctx, seqs[:1])  # warm the step graph for a batch of one
    p0 = llama_cpp.llama_perf_context(ctx).n_reused
    t0 = time.perf_counter()
    for j in range(200):
        mixer.set(0, {POOL[j % len(POOL)]: 0.5, POOL[(j + 3) % len(POOL)]: 0.25})
    res["set_mix_us"] = np.array((time.perf_counter() - t0) / 200 * 1e6)
    mixer.set(0, MIXES[0])
    steps = _decode_with_mix_changes(ctx, mixer, seqs[0].prompt, seqs[0].forced)
    res["reuse_with_changes"] = np.array([steps, llama_cpp.llama_perf_context(ctx).n_reused - p0])


def _case_exact_f32(res, ctx, mixer, adapters, seqs) -> None:
    """One adapter per sequence, f32 adapters. Oracle: the same batch with the stock adapter set on the whole context."""
    from loramux.native import teacher

    for i, mix in enumerate(SINGLES):
        mixer.set(i, mix)
    for i, g in enumerate(teacher.decode_forced(ctx, seqs)):
        res[f"batch_{i}"] = g
    for i in range(len(SINGLES)):
        mixer.clear(i)
    for i, mix in enumerate(SINGLES):
        teacher.set_stock_adapters(ctx, _stock(adapters, mix))
        res[f"stock_batch_{i}"] = teacher.decode_forced(ctx, seqs)[i]
    teacher.set_stock_adapters(ctx, [])


def _decode_with_mix_changes(ctx, mixer, prompt, forced) -> int:
    """Decode ``forced`` one token per step, changing the sequence's mix before every step."""
    from loramux.llama_batch import TokenBatch
    from loramux.native import teacher

    teacher.decode_forced(ctx, [teacher.ForcedSequence(prompt, [])])
    batch = TokenBatch(1)
    try:
        for t, tok in enumerate(forced):
            mixer.set(0, {POOL[t % len(POOL)]: 0.5, POOL[(t + 1) % len(POOL)]: 0.5})
            batch.set([tok], [len(prompt) + t], 0, True)
            batch.decode(ctx)
    finally:
        batch.close()
    return len(forced)


# ---------------------------------------------------------------- tests --
def _convert_pool(base_model, out_dir: Path, outtype: str) -> Path:
    from loramux.converters import convert_peft_to_gguf

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in POOL:
        target = out_dir / f"{name}.gguf"
        if not target.exists():
            convert_peft_to_gguf(FIXTURES / name, base_model, target, outtype=outtype)
    return out_dir


def _run_case(case: str, adapter_dir: Path, tmp_path: Path, form: str = "fused") -> dict:
    out = tmp_path / f"{case}.npz"
    run_worker(__file__, case, out, adapter_dir, form)
    data = dict(np.load(out))
    if "unavailable" in data:
        native_missing(str(data["unavailable"]))
    return data


@pytest.fixture(scope="module")
def pool_f16(tmp_path_factory, base_model, shared_dir) -> Path:
    return _convert_pool(base_model, tmp_path_factory.mktemp("pool_f16"), "f16")


@pytest.fixture(scope="module", params=list(FORMS))
def mixed(request, tmp_path_factory, pool_f16):
    """The mixed-batch run in each form: the fused CPU op, and the device (CUDA) form forced on the CPU."""
    return _run_case("mixed", pool_f16, tmp_path_factory.mktemp(f"mixed-{request.param}"), request.param)


def _diffs(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a - b)
    return float(d.max()), float(d.mean())


def test_mixed_batch_matches_each_request_alone(mixed):
    report = {}
    for i, mix in enumerate(MIXES):
        mx, mean = _diffs(mixed[f"batch_{i}"], mixed[f"alone_{i}"])
        report[i] = (round(mx, 3), round(mean, 4))
        assert mx <= MAX_ABS_TOL and mean <= MEAN_ABS_TOL, f"sequence {i} mix {mix}: max {mx}, mean {mean}"
    print(json.dumps({"max_mean_abs_diff_per_sequence": report}))


def test_sequence_without_mix_is_the_base_model_bitwise(mixed):
    base = MIXES.index(None)
    assert np.array_equal(mixed[f"batch_{base}"], mixed[f"plain_{base}"]), "no-mix sequence differs from the base model"
    # and the base model itself only moves within the floor between batch and alone
    mx, mean = _diffs(mixed[f"plain_{base}"], mixed[f"alone_{base}"])
    assert mx <= MAX_ABS_TOL and mean <= MEAN_ABS_TOL
    print(json.dumps({"base_batch_vs_alone_floor": [round(mx, 3), round(mean, 4)]}))


def test_greedy_tokens_agree_where_the_oracle_is_decisive(mixed):
    n_decisive = 0
    for i, mix in enumerate(MIXES):
        alone, batch = mixed[f"alone_{i}"], mixed[f"batch_{i}"]
        top2 = np.sort(alone, axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > MAX_ABS_TOL
        agree = alone.argmax(axis=1) == batch.argmax(axis=1)
        n_decisive += int(decisive.sum())
        assert agree[decisive].all(), f"sequence {i} mix {mix}: greedy token differs at decisive steps {np.where(decisive & ~agree)[0]}"
    assert n_decisive >= N_STEPS, f"only {n_decisive} decisive steps: the comparison says little"


def test_changing_one_mix_leaves_the_others_unchanged(mixed):
    for i in range(len(MIXES)):
        if i == 3:
            assert not np.array_equal(mixed["changed_3"], mixed["batch_3"]), "the changed mix had no effect"
            continue
        assert np.array_equal(mixed[f"changed_{i}"], mixed[f"batch_{i}"]), f"sequence {i} moved when sequence 3's mix changed"


def test_wrong_scale_is_caught_by_the_tolerance(mixed):
    mx, mean = _diffs(mixed["wrong_scale_0"], mixed["alone_0"])
    assert mx > MAX_ABS_TOL or mean > MEAN_ABS_TOL, f"a 1.5x scale went unnoticed (max {mx}, mean {mean})"


def test_mix_changes_keep_graph_reuse_and_cost_microseconds(mixed):
    steps, reused = (int(x) for x in mixed["reuse_with_changes"])
    assert reused >= steps - 1, f"only {reused} of {steps} decodes reused the graph while mixes changed"
    assert mixed["reused_in_run"] > 0
    us = float(mixed["set_mix_us"])
    print(json.dumps({"set_seq_mix_us_python": round(us, 2)}))
    assert us < 1000, f"setting a mix took {us:.0f} us"


@pytest.mark.parametrize("form", list(FORMS))
def test_f32_adapters_match_stock_within_the_floor(form, tmp_path_factory, base_model, shared_dir):
    """f32 adapters (the kernel's f32 path for A), one adapter per sequence: each row of the mixed
    batch matches the same batch run with stock llama_set_adapters_lora within the floor.

    Not bitwise: on CPU the mix is applied by loramux's fused kernel (per token
    ``res + sum_j w_j B_j (A_j^T x)``), whose float sums are grouped differently from stock's two
    matrix products and scale; measured max 0.94 on the first rows, i.e. the floor, not a drift.
    """
    d = _convert_pool(base_model, tmp_path_factory.mktemp("pool_f32"), "f32")
    data = _run_case("exact_f32", d, tmp_path_factory.mktemp(f"exact-{form}"), form)
    for i, mix in enumerate(SINGLES):
        got, want = data[f"batch_{i}"], data[f"stock_batch_{i}"]
        if not mix:
            assert np.array_equal(got, want), f"sequence {i} without a mix differs from the base: {np.abs(got - want).max()}"
            continue
        mx, mean = _diffs(got, want)
        assert mx <= MAX_ABS_TOL and mean <= MEAN_ABS_TOL, f"sequence {i} mix {mix}: max {mx}, mean {mean}"


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
