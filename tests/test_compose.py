"""LoraHub composition on the real model: batched scoring against each item alone, the optimiser, the mix GGUF.

Oracles: a scored item's loss is recomputed from the logits of that item decoded alone under its
mix (stock llama.cpp, the mix set on the context); the rank-concatenated GGUF loaded as one
adapter gives the logits of the mix it holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from loramux.engine.scoring import ScoreItem, mean_nll
from loramux.errors import LoramuxError
from loramux.mix import Mix

from conftest import FIXTURES, GAP_FLOOR, load_rows, lora_factors, write_rows
from floors import MERGE_NLL_TOL
from floors import SCORE_NLL_TOL as NLL_TOL
from floors import SCORE_SAME_TOL as SAME_TOL

ADAPTERS = ["boolean_expressions", "dyck_languages", "navigate", "sports_understanding", "object_counting"]


@pytest.fixture(scope="module")
def pool(base_model, shared_dir):
    from loramux.pool import AdapterPool

    with AdapterPool(base_model, n_ctx=1024, n_seq_max=16, n_batch=4096, max_active=len(ADAPTERS)) as p:
        for name in ADAPTERS:
            p.load(FIXTURES / name)
        yield p


def _examples(task: str, n: int = 5) -> list[dict]:
    return load_rows("train", {task}, limit_per_task=n)


def test_batched_scores_equal_each_item_decoded_alone(pool):
    from loramux.compose import example_items

    items = example_items(pool, _examples("boolean_expressions", 3))
    mixes = [Mix(), Mix({"boolean_expressions": 1.0}), Mix({n: 0.4 - 0.2 * i for i, n in enumerate(ADAPTERS)})]
    batch = [ScoreItem(t, n, m) for m in mixes for t, n in items]
    got = pool.score(batch)
    for item, loss in zip(batch, got):
        alone = pool.logits(item.tokens, item.mix, path="native")  # the same item decoded alone
        assert loss == pytest.approx(mean_nll(alone[item.n_prompt - 1 : -1], item.tokens[item.n_prompt :]), abs=SAME_TOL)
        stock = pool.logits(item.tokens, item.mix, path="context")  # stock llama.cpp's LoRA
        assert loss == pytest.approx(mean_nll(stock[item.n_prompt - 1 : -1], item.tokens[item.n_prompt :]), abs=NLL_TOL)
    assert got[3] < got[0] - 5 * NLL_TOL  # the task's adapter explains its targets better than the base
    with pytest.raises(LoramuxError, match="n_prompt"):
        ScoreItem((1, 2), 2, Mix())


def test_compose_lowers_the_loss_of_a_held_out_task_and_is_reproducible(pool):
    from loramux.compose import compose, example_items

    examples = _examples("web_of_lies")  # no adapter of this task in the pool
    seen = []
    result = compose(pool, examples, budget=16, population=8, seed=1, progress=lambda d, b: seen.append((d, b)))
    assert [d for d, _ in seen] == [8, 16] and seen[1][1] <= seen[0][1]
    assert result.loss < result.base_nll  # better than the base model (w = 0)
    assert all(abs(w) <= 1.5 for w in result.mix.values())
    nll = np.mean(pool.score([ScoreItem(t, n, result.mix) for t, n in example_items(pool, examples)]))
    assert nll == pytest.approx(result.nll, abs=1e-6)
    again = compose(pool, examples, budget=16, population=8, seed=1, batched=False)
    assert again.mix.to_dict() == pytest.approx(result.mix.to_dict(), abs=1e-9) or abs(again.loss - result.loss) < 1e-3


def test_compose_refuses_what_it_cannot_do(pool, base_model):
    from loramux.compose import compose
    from loramux.pool import AdapterPool

    with pytest.raises(LoramuxError, match="1 to 5 examples"):
        compose(pool, _examples("web_of_lies", 6))
    with AdapterPool(base_model, n_ctx=512, max_active=2) as narrow:
        for name in ADAPTERS[:3]:
            narrow.load(FIXTURES / name)
        with pytest.raises(LoramuxError, match="max_active=3"):
            compose(narrow, _examples("web_of_lies", 2), budget=2)


def test_the_mix_gguf_holds_exactly_the_mix(pool, tmp_path):
    """Read back, every module's B A is sum_a w_a k_a B_a A_a of the source files (f32 exact); loaded as one
    adapter it gives the mix's logits within llama.cpp's floor, and a mix missing one adapter falls outside it."""
    from loramux.converters.gguf_to_torch import dequantized_tensors
    from loramux.converters.mix_gguf import write_mix_gguf

    mix = Mix({"boolean_expressions": 0.8, "dyck_languages": -0.5, "object_counting": 1.2})
    files = {n: pool.adapters[n].gguf_path for n in mix}
    out = write_mix_gguf(mix, files, pool.base_path, tmp_path / "mixed.gguf")
    written = dequantized_tensors(out)
    modules = sorted(n[: -len(".lora_a")] for n in written if n.endswith(".lora_a"))
    assert modules and "blk.0.attn_q.weight" in modules
    for module in modules:
        want = 0.0
        for name, w in mix.items():
            factors = lora_factors(files[name], module)
            if factors is not None:
                a, b, k = factors
                want = want + w * k * (b.astype(np.float64) @ a.astype(np.float64))
        got = written[module + ".lora_b"].astype(np.float64) @ written[module + ".lora_a"].astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    pool.load(out, name="mixed")
    try:
        tokens = pool.tokenize("Complete the rest of the sequence: ( [ { } ", add_bos=True)
        got = pool.logits(tokens, Mix({"mixed": 1.0}), path="context")
        assert np.abs(got - pool.logits(tokens, mix, path="context")).max() < GAP_FLOOR
        dropped = Mix({n: w for n, w in mix.items() if n != "dyck_languages"})
        assert np.abs(got - pool.logits(tokens, dropped, path="context")).max() > 2 * GAP_FLOOR
    finally:
        pool.unload("mixed")


def test_compose_command_writes_a_mix_file_usable_as_a_router(tmp_path, base_model):
    from loramux.cli import main
    from loramux.router.registry import open_router

    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in ADAPTERS[:3]:
        (folder / name).symlink_to(FIXTURES / name)
    examples = write_rows(tmp_path / "few.jsonl", _examples("web_of_lies", 3))
    out, gguf = tmp_path / "mix.json", tmp_path / "mix.gguf"
    assert (
        main(
            [
                "compose",
                "--base",
                str(base_model),
                "--adapters",
                str(folder),
                "--examples",
                str(examples),
                "--budget",
                "8",
                "--population",
                "4",
                "-o",
                str(out),
                "--gguf",
                str(gguf),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["method"] == "lorahub" and data["evaluations"] == 8 and data["loss"] <= data["base_nll"]
    assert gguf.is_file() or not data["mix"]
    from loramux.pool import AdapterPool

    with AdapterPool(base_model, n_ctx=256) as p:
        for name in ADAPTERS[:3]:
            p.load(FIXTURES / name)
        assert open_router(f"file:{out}", p).route("x").mix == Mix(data["mix"])


def test_lorahub_merge_mode_scores_the_a_b_average(pool, tmp_path):
    """mode="lorahub": the candidate is LoraHub's A/B merge (cross terms), not the output-space sum."""
    from loramux.compose import CompositionObjective, example_items
    from loramux.converters.mix_gguf import averaged_modules

    same = ["boolean_expressions", "formal_fallacies"]  # both r=8, alpha=16, q/k/v/o: the merge applies
    pool.load(FIXTURES / "formal_fallacies")
    items = example_items(pool, _examples("formal_fallacies", 2))
    # one adapter merged at weight w is (w B)(w A): the output-space mix at w^2
    merged = CompositionObjective(pool, same[:1], items, 0.05, True, mode="lorahub").nll([np.array([0.8]), np.array([1.3])])
    output = CompositionObjective(pool, same[:1], items, 0.05, True).nll([np.array([0.64]), np.array([1.69])])
    wrong = CompositionObjective(pool, same[:1], items, 0.05, True).nll([np.array([0.8]), np.array([1.3])])  # w, not w^2
    for got, want, not_want in zip(merged, output, wrong):
        assert abs(got - want) <= MERGE_NLL_TOL and abs(got - want) < abs(got - not_want), (merged, output, wrong)
    w = np.array([0.6, 0.7])
    assert CompositionObjective(pool, same, items, 0.05, True, mode="lorahub").nll([w])[0] > 0
    assert not any(n.startswith("lorahub-candidate") for n in pool.names)  # candidates unloaded
    planned, alpha = averaged_modules(dict(zip(same, w)), {n: pool.adapters[n].gguf_path for n in same})
    assert alpha == 16.0 and planned[0].lora_a.shape[0] == 8
    with pytest.raises(LoramuxError, match="one rank, alpha and module set"):
        averaged_modules(
            {"boolean_expressions": 1.0, "dyck_languages": 1.0},
            {n: pool.adapters[n].gguf_path for n in ("boolean_expressions", "dyck_languages")},
        )
    pool.unload("formal_fallacies")
