"""Adapter slots: loading or unloading one adapter costs that adapter, and the others stay exact.

Each load puts one adapter into a slot of the native pool (``loramux_set_slots``): the library
reads that adapter only and copies every other slot's stacked matrices and routing data. The
tests count, with the kernel's inotify, which pinned adapter files llama.cpp opens while an adapter
loads next to 3 streaming requests, and check bit for bit that a kept adapter computes the same
logits before and after others come and go.
"""

from __future__ import annotations

import numpy as np
import pytest
from file_opens import FileOpens
from test_native_abi import _rank_600

from loramux.pool import AdapterPool

from conftest import native_missing, write_adapter_variant

FIRST = ["navigate", "snarks", "causal_judgement"]  # all seven projections r=4; q/k/v/o r=8; q/v r=8
LATER = "dyck_languages"  # rsLoRA r=16 q/v: a new rank in the q/v stacks
PROMPT = "Question: If you follow these instructions, do you return to the starting point? Take 3 steps. Turn around. Take 3 steps."


@pytest.fixture(scope="module")
def pool(base_model):
    with AdapterPool(base_model, n_ctx=256, n_seq_max=4, max_active=3) as p:
        if not p.native:
            native_missing("adapter slots are the native pool's")
        yield p


def _pinned_folder(pool: AdapterPool):
    folders = {h.path.parent for h in pool.held().values()}
    assert len(folders) == 1, folders
    return folders.pop()


def test_a_load_next_to_streaming_requests_opens_no_other_adapter(pool, converted_dir):
    pool.load_adapters([converted_dir / f"{n}.gguf" for n in FIRST])
    held = pool.held()
    assert sorted(held) == sorted(FIRST) and all(h.slot is not None for h in held.values())
    others = {h.path.name for h in held.values()}
    streams = [pool.create_completion(PROMPT, mix={n: 1.0}, max_tokens=24, temperature=0, stream=True) for n in FIRST]
    firsts = [next(s) for s in streams]  # all three are decoding
    with FileOpens(_pinned_folder(pool)) as opens:
        pool.load(converted_dir / f"{LATER}.gguf")
    assert not others & set(opens.names), f"loading {LATER} re-read {sorted(others & set(opens.names))}"
    texts = [f["choices"][0]["text"] + "".join(c["choices"][0]["text"] for c in s) for f, s in zip(firsts, streams)]
    alone = [pool.create_completion(PROMPT, mix={n: 1.0}, max_tokens=24, temperature=0)["choices"][0]["text"] for n in FIRST]
    assert texts == alone  # the streams kept their mixes through the change

    # negative control: a mix wider than max_active runs on the whole context, which needs the
    # released adapters' llama.cpp tensors again: the counter sees those files opened
    with FileOpens(_pinned_folder(pool)) as opens:
        pool.create_completion(PROMPT, mix=dict.fromkeys([*FIRST, LATER], 0.25), max_tokens=1, temperature=0)
    assert others <= set(opens.names), opens.names


def test_kept_adapters_compute_the_same_logits_bit_for_bit_as_others_come_and_go(pool, converted_dir):
    tokens = pool.tokenize(PROMPT, add_bos=True)
    mixes = [{"navigate": 1.0}, {"snarks": 0.6, "causal_judgement": 0.4}]
    before = [pool.logits(tokens, m, path="native") for m in mixes]
    pool.load(converted_dir / "object_counting.gguf")  # rank_pattern: ranks 4 and 16 in one adapter
    pool.unload(LATER)  # the q/v stacks lose their rank-16 member: r_max shrinks, others are re-padded
    pool.load(converted_dir / "sports_understanding.gguf")  # f32 source next to f16 ones
    after = [pool.logits(tokens, m, path="native") for m in mixes]
    for m, b, a in zip(mixes, before, after):
        assert np.array_equal(a, b), f"{m}: max |diff| {np.abs(a - b).max()}"
    # the oracle tells mixes apart (it would catch a slot copied from the wrong adapter)
    assert not np.array_equal(before[0], pool.logits(tokens, {"snarks": 1.0}, path="native"))


def test_slots_are_reused_and_a_refused_load_changes_nothing(pool, converted_dir, tmp_path):
    from loramux.errors import RuntimeLoadError

    slots = {n: h.slot for n, h in pool.held().items()}
    pool.unload("snarks")
    pool.load(converted_dir / "snarks.gguf", name="snarks_again")
    assert pool.held()["snarks_again"].slot == slots["snarks"]  # the freed slot is taken again
    tokens = pool.tokenize(PROMPT, add_bos=True)
    before = pool.logits(tokens, {"navigate": 1.0}, path="native")
    big = write_adapter_variant(converted_dir / "causal_judgement.gguf", tmp_path / "rank600.gguf", _rank_600)
    with pytest.raises(RuntimeLoadError, match="'rank600'.*blk.4.attn_v.weight.*rank 600"):
        pool.load(big)  # refused by the library, naming adapter and tensor
    assert "rank600" not in pool.held() and "rank600" not in pool.names
    assert np.array_equal(pool.logits(tokens, {"navigate": 1.0}, path="native"), before)


def test_the_probe_borrows_the_engines_adapters_reads_no_file_per_pass_and_lets_go_on_unload(pool):
    tokens = pool.tokenize(PROMPT, add_bos=True)
    mix = {"navigate": 0.5, "causal_judgement": 0.5}
    folder = _pinned_folder(pool)
    with FileOpens(folder) as first_opens:
        first = pool.hidden_states(tokens, ["attn_norm-29"], mix=mix)["attn_norm-29"]
    assert {pool.held()[n].path.name for n in mix} <= set(first_opens.names)  # the counter sees the borrow's loads
    with FileOpens(folder) as opens:
        again = pool.hidden_states(tokens, ["attn_norm-29"], mix=mix)["attn_norm-29"]
    assert not opens.names and np.array_equal(first, again)  # no file read per pass; the same sum, bit for bit
    assert pool.held()["navigate"].loaded and pool.held()["causal_judgement"].loaded
    pool.unload("causal_judgement")  # the probe lets go first, so the unload does not wait on it
    assert "causal_judgement" not in pool.held() and not pool.held()["navigate"].loaded  # given back, released
    base = pool.hidden_states(tokens, ["attn_norm-29"])["attn_norm-29"]
    assert not np.array_equal(base, first)


def test_one_adapter_goes_into_a_free_slice_in_place_and_computes_what_a_fresh_pool_computes(base_model, converted_dir):
    """A pool keeps free slices; an adapter whose weights and ranks fit is written into them alone,
    and an unloaded one leaves a free slice (its stale rows stay, so per-token routing must skip
    it). Both give, bit for bit, the logits of a pool registered in one go with the same adapters."""
    tokens = None
    with AdapterPool(base_model, n_ctx=256, n_seq_max=2, max_active=3) as p:
        if not p.native:
            native_missing("adapter slots are the native pool's")
        p.load_adapters([converted_dir / f"{n}.gguf" for n in FIRST])
        tokens = p.tokenize(PROMPT, add_bos=True)
        assert (p.stats.pool_rebuilt, p.stats.pool_in_place) == (1, 0)
        p.load(converted_dir / "boolean_expressions.gguf")  # q/k/v/o r=8: the q/v and k/o stacks have room
        assert (p.stats.pool_rebuilt, p.stats.pool_in_place) == (1, 1)
        fixed = p.logits(tokens, {"boolean_expressions": 1.0, "navigate": 0.5}, path="native")
        p.unload("snarks")  # in place: snarks' slices become free slices, rows left as they were
        assert (p.stats.pool_rebuilt, p.stats.pool_in_place) == (1, 2)
        routed = p.logits(tokens, "arrow:k=2", path="native")
        chosen = {a for c in p.token_choices(tokens, "spectr:k=2").choices for a in c.adapters}
        assert chosen and chosen <= set(p.names), chosen
    with AdapterPool(base_model, n_ctx=256, n_seq_max=2, max_active=3) as fresh:
        fresh.load_adapters([converted_dir / f"{n}.gguf" for n in ("navigate", "causal_judgement", "boolean_expressions")])
        assert np.array_equal(fixed, fresh.logits(tokens, {"boolean_expressions": 1.0, "navigate": 0.5}, path="native"))
        want = fresh.logits(tokens, "arrow:k=2", path="native")
        assert np.array_equal(routed, want), f"max |diff| {np.abs(routed - want).max()}"
        # the oracle tells routings apart: k=1 routes to fewer adapters than k=2
        assert not np.array_equal(want, fresh.logits(tokens, "arrow:k=1", path="native"))
