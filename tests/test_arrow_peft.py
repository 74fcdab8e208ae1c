"""loramux's Arrow in the llama.cpp graph against PEFT's own ``create_arrow_model``.

The six fixtures that share r=8 and q/k/v/o (PEFT requires one rank and one target set) are
routed by PEFT in torch (float32, the base's dequantized weights; tests/arrow_reference.py) and by
loramux in llama.cpp (the Q4_1 base), teacher-forced over real BBH dev prompts. Both use exact
prototypes: PEFT's 15 power iterations from a random start miss the top singular vector by up to
30 degrees where the top two singular values are close (arrow_reference records the angles), so
PEFT's layers get the exact vectors, as loramux computes them.

Compared:
- the per-token choices: at every adapted weight of every layer, the top-k set loramux recorded
  is PEFT's wherever PEFT's k-th and (k+1)-th scores are not within the input noise of the Q4_1
  base (ARROW_CHOICE_MARGIN), and the weights agree within ARROW_WEIGHT_TOL;
- the logits, through the effect of routing: (Arrow - base) in llama.cpp against (Arrow - base) in
  torch, relative to its size, within the floor measured for one plain adapter the same way
  (ARROW_EFFECT_REL_TOL).
Negative controls: PEFT with k=2, or with T=0.5, is caught by the choices (k) and the weights (T).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import native_missing, run_worker
from floors import ARROW_CHOICE_MARGIN, ARROW_EFFECT_REL_TOL, ARROW_WEIGHT_TOL

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
DEV = ROOT.parent / "shared" / "data" / "bbh" / "dev.jsonl"
TASKS = ["boolean_expressions", "penguins_in_a_table", "snarks"]
SINGLE = "formal_fallacies"  # the floor: one plain adapter, llama.cpp vs PEFT
K, T = 3, 1.0


def dev_prompts() -> list[str]:
    import json

    rows = [json.loads(line) for line in DEV.open()]
    return [next(r["input"] for r in rows if r["task"] == t) for t in TASKS]


# ---------------------------------------------------------------- worker (subprocess) --
def _worker(out: Path, adapter_dir: Path, tokens_file: Path) -> None:
    from loramux import native

    if not native.available():
        np.savez(out, unavailable=np.array(native.status().reason))
        return
    import llama_cpp as lc

    from loramux.base_model import default_base_model
    from loramux.llama_runtime import silence_llama_log
    from loramux.native import teacher
    from loramux.native.mixer import SeqMixer

    silence_llama_log(errors_to_stderr=True)
    prompts = [list(map(int, p)) for p in np.load(tokens_file, allow_pickle=True)["prompts"]]
    model = lc.llama_model_load_from_file(str(default_base_model()).encode(), lc.llama_model_default_params())
    names = sorted(p.stem for p in adapter_dir.glob("*.gguf"))
    adapters = {n: lc.llama_adapter_lora_init(model, str(adapter_dir / f"{n}.gguf").encode()) for n in names}
    ctx = teacher.new_context(model, n_seq_max=len(prompts), n_ctx=2048, n_threads=2)
    mixer = SeqMixer(ctx, adapters, max_active=K)
    seqs = [teacher.ForcedSequence(p[:1], p[1:]) for p in prompts]
    arrays = {}
    for label in ("base", "single", "arrow"):
        for s in range(len(prompts)):
            if label == "arrow":
                mixer.set_routing(s, "arrow", K, T)
            else:
                mixer.set(s, {SINGLE: 1.0} if label == "single" else None)
        mixer.record(label == "arrow")
        for s, logits in enumerate(teacher.decode_forced(ctx, seqs)):
            arrays[f"{label}_{s}"] = logits
    rows = mixer.take_choices()
    arrays["rec"] = np.array([(c.module, c.seq_id, c.pos, ",".join(c.adapters), ",".join(f"{w:.7g}" for w in c.weights)) for c in rows])
    np.savez(out, **arrays)


# ---------------------------------------------------------------- fixtures --
@pytest.fixture(scope="module")
def prompts(base_model) -> list[list[int]]:
    from peft_reference import prompt_tokens

    return [prompt_tokens(base_model, p) for p in dev_prompts()]


@pytest.fixture(scope="module")
def native_run(tmp_path_factory, base_model, prompts) -> dict:
    from arrow_reference import ARROW_FIXTURES

    from loramux.converters import convert_peft_to_gguf

    folder = tmp_path_factory.mktemp("arrow_pool")
    for name in ARROW_FIXTURES:
        convert_peft_to_gguf(FIXTURES / name, base_model, folder / f"{name}.gguf", outtype="f32")
    tokens = folder / "prompts.npz"
    np.savez(tokens, prompts=np.array(prompts, dtype=object))
    out = folder / "native.npz"
    run_worker(__file__, out, folder, tokens)
    data = dict(np.load(out))
    if "unavailable" in data:
        native_missing(str(data["unavailable"]))
    return data


@pytest.fixture(scope="module")
def torch_runs(base_model, prompts) -> dict:
    import torch
    from arrow_reference import arrow_choices, arrow_fixture_paths, arrow_logits, arrow_model

    from peft_reference import hf_base_model, one_thread, peft_model

    runs: dict = {}
    with one_thread(), torch.no_grad():
        model = hf_base_model(str(base_model))
        runs["base"] = [model(torch.tensor([p])).logits[0].numpy() for p in prompts]
        with peft_model(base_model, FIXTURES / SINGLE) as single:
            runs["single"] = [single(torch.tensor([p])).logits[0].numpy() for p in prompts]
        for label, k, t in (("arrow", K, T), ("k2", 2, T), ("t05", K, 0.5)):
            with arrow_model(base_model, arrow_fixture_paths(), top_k=k, temperature=t) as m:
                runs[label] = [arrow_logits(m, p) for p in prompts]
                runs[f"choices_{label}"] = [arrow_choices(m, p) for p in prompts]
                runs["names"] = m.arrow_info.names
    return runs


# ---------------------------------------------------------------- comparisons --
def _effect_rel(native: dict, runs: dict, label: str, ref: str) -> float:
    """max over prompts of ||(L_nat(label) - L_nat(base)) - (L_torch(ref) - L_torch(base))|| / ||L_torch(ref) - L_torch(base)||."""
    worst = 0.0
    for s in range(len(runs["base"])):
        nat = native[f"{label}_{s}"] - native[f"base_{s}"]
        ref_effect = runs[ref][s] - runs["base"][s]
        worst = max(worst, float(np.linalg.norm(nat - ref_effect) / np.linalg.norm(ref_effect)))
    return worst


def _record(native: dict, names: list[str]) -> dict[tuple[str, int, int], tuple[list[int], list[float]]]:
    out = {}
    for module, seq, pos, ids, ws in native["rec"]:
        out[(str(module), int(seq), int(pos))] = ([names.index(a) for a in ids.split(",")], [float(w) for w in ws.split(",")])
    return out


def _hf_to_gguf(module: str) -> str:
    from loramux.converters.name_map import gguf_tensor_name

    return gguf_tensor_name("llama", module)


def _compare_choices(native: dict, runs: dict, label: str) -> tuple[int, int, np.ndarray]:
    """(rows compared, top-k sets that differ, max weight difference per agreeing row) against PEFT's run ``label``."""
    rec = _record(native, runs["names"])
    compared = differ = 0
    dws: list[float] = []
    for s, per_module in enumerate(runs[f"choices_{label}"]):
        for module, ch in per_module.items():
            srt = -np.sort(-ch.scores, axis=1)
            for pos in range(ch.indices.shape[0]):
                k = ch.indices.shape[1]
                if srt[pos, k - 1] - srt[pos, k] <= ARROW_CHOICE_MARGIN * srt[pos, 0]:
                    continue  # within the Q4_1 input noise: either order is right
                ids, ws = rec[(_hf_to_gguf(module), s, pos)]
                compared += 1
                if sorted(ids) != sorted(ch.indices[pos].tolist()):
                    differ += 1
                    continue
                mine = dict(zip(ids, ws))
                dws.append(max(abs(mine[e] - float(w)) for e, w in zip(ch.indices[pos], ch.weights[pos])))
    return compared, differ, np.array(dws or [0.0])


def test_routing_effect_on_the_logits_equals_peft_within_the_floor(native_run, torch_runs):
    floor = _effect_rel(native_run, torch_runs, "single", "single")
    arrow = _effect_rel(native_run, torch_runs, "arrow", "arrow")
    print(f"relative effect error: one adapter (the floor) {floor:.3f}, Arrow {arrow:.3f}")
    assert floor <= ARROW_EFFECT_REL_TOL, f"the floor itself ({floor:.3f}) is above the tolerance: the comparison is off"
    assert arrow <= ARROW_EFFECT_REL_TOL, f"Arrow's effect differs from PEFT's by {arrow:.3f} (floor {floor:.3f})"


def test_every_token_chooses_the_adapters_peft_chooses(native_run, torch_runs):
    compared, differ, dw = _compare_choices(native_run, torch_runs, "arrow")
    n_modules = len(torch_runs["choices_arrow"][0])
    total = n_modules * sum(len(c[next(iter(c))].indices) for c in torch_runs["choices_arrow"])
    print(
        f"{compared} of {total} (module, token) choices compared over {n_modules} modules: {differ} differ; "
        f"weight difference median {np.median(dw):.2e}, max {dw.max():.2e}"
    )
    assert compared >= 0.8 * total, f"only {compared} of {total} choices are well separated"
    assert differ <= 0.005 * compared, f"{differ} of {compared} well-separated top-k sets differ from PEFT's"
    assert np.median(dw) <= ARROW_WEIGHT_TOL["median"] and dw.max() <= ARROW_WEIGHT_TOL["max"], "weights differ from PEFT's"


@pytest.mark.parametrize("wrong", ["k2", "t05"])
def test_a_wrong_k_or_temperature_is_caught(native_run, torch_runs, wrong):
    compared, differ, dw = _compare_choices(native_run, torch_runs, wrong)
    print(f"{wrong}: {compared} compared, {differ} top-k sets differ, weight difference median {np.median(dw):.2e}, max {dw.max():.2e}")
    if wrong == "k2":
        assert differ == compared, "PEFT with k=2 was not told apart by the choices"
    else:
        assert np.median(dw) > 10 * ARROW_WEIGHT_TOL["median"], f"PEFT with T=0.5 was not told apart by the weights ({np.median(dw):.2e})"


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
