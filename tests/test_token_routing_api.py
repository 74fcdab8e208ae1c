"""Per-token routing (Arrow, SpectR) through loramux's own doors: the mix spec, the pool, the engine's
batch and prefix cache, the CLI, ``loramux eval``, the server (openai client) and the hook's refusal.

The routing itself (scores, top-k, weights against numpy and PEFT) is checked by
tests/test_native_routing.py and tests/test_arrow_peft.py; here the question is whether every door
runs the routed mix it was asked for, and never the base model or another mix in its place.

Oracle for generations: the same request alone, teacher-forced step by step on the per-sequence
path (``pool.logits(..., path="native")``), greedy; a generated token must equal it, except at a
step whose top-two logit gap is at or below GAP_FLOOR (tests/floors.py), where the texts may part.

The first block is pure Python (no model); the rest needs the native library (skipped without it,
failed under LORAMUX_REQUIRE_NATIVE=1) and opens one pool of four adapters with mixed ranks and
target modules (q/v for all four, k/o for three, the MLP for two: k is capped per weight's group).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loramux.errors import LoramuxError, MixError
from loramux.mix import Mix
from loramux.token_routing import TokenRouting

from conftest import FIXTURES, GAP_FLOOR, ROOT, load_rows, native_missing, write_rows

ADAPTERS = ["boolean_expressions", "navigate", "sports_understanding", "hyperbaton"]
STEPS = 10
# One llama.cpp thread per process: the machine is shared, and two threads on two busy cores stall
# for seconds per step at their barriers (as the soak servers in RELIABILITY.md run).
THREADS = "1"


# --- the spec: parsing, canonical form, equality (pure Python) ----------------------------------

ROUND_TRIPS = [
    ("arrow", Mix.arrow(), "arrow:k=3,T=1"),
    ("arrow:k=3,T=1", Mix.arrow(k=3, temperature=1.0), "arrow:k=3,T=1"),
    ("arrow:k=2,T=0.5", Mix.arrow(k=2, temperature=0.5), "arrow:k=2,T=0.5"),
    (" arrow : T = 1e-3 , k = 1 ", Mix.arrow(k=1, temperature=0.001), "arrow:k=1,T=0.001"),
    ("spectr", Mix.spectr(), "spectr:k=4"),
    ("spectr:k=4", Mix.spectr(k=4), "spectr:k=4"),
    ("spectr:k=2", Mix.spectr(k=2), "spectr:k=2"),
]


@pytest.mark.parametrize("spec,want,canonical", ROUND_TRIPS)
def test_routing_specs_parse_and_round_trip(spec, want, canonical):
    mix = Mix.parse(spec)
    assert mix == want and hash(mix) == hash(want)
    assert Mix.coerce(spec) == want
    assert str(mix) == canonical
    assert Mix.parse(str(mix)) == mix  # the canonical spec parses back to an equal mix
    assert Mix.coerce(mix.to_json()) == mix  # and so does the JSON form responses echo
    assert json.loads(json.dumps(mix.to_json())) == mix.to_json()
    assert eval(repr(mix), {"Mix": Mix, "TokenRouting": TokenRouting}) == mix


def test_a_routed_mix_is_never_the_base_model_nor_another_mix():
    arrow = Mix.arrow()
    assert arrow and not arrow.is_base and Mix().is_base and not Mix()
    assert len(arrow) == 0 and arrow.to_dict() == {} and list(arrow) == [] and "navigate" not in arrow
    assert arrow.to_json() == {"mode": "arrow", "k": 3, "temperature": 1.0}
    assert Mix.spectr().to_json() == {"mode": "spectr", "k": 4, "temperature": None}
    assert arrow.token_routing == TokenRouting("arrow", 3, 1.0) and Mix({"a": 1.0}).token_routing is None
    others = [Mix(), Mix.arrow(k=2), Mix.arrow(temperature=0.5), Mix.spectr(k=3), Mix.spectr(), Mix({"a": 1.0})]
    for other in others:  # the prefix cache is keyed by the mix: these must all be different keys
        assert arrow != other and other != arrow
    assert len({arrow, *others}) == len(others) + 1
    assert arrow != {} and arrow == {"mode": "arrow"} and Mix.spectr(k=3) == {"mode": "spectr", "k": 3}
    assert arrow.check_known([]) is arrow  # it names no adapter: it routes among all that are loaded


def test_the_prefix_cache_never_gives_one_mix_the_kv_of_another():
    from loramux.engine.slots import NATIVE, Slot, best_slot

    prompt = list(range(1, 20))
    for kv_mix, mix, reuse in [
        (Mix.arrow(), Mix.arrow(), 18),
        (Mix.arrow(), Mix(), 0),
        (Mix(), Mix.arrow(), 0),
        (Mix.arrow(), Mix.arrow(k=2), 0),
        (Mix.arrow(), Mix.spectr(k=3), 0),
        (Mix.spectr(), Mix.spectr(), 18),
    ]:
        other, slot = Slot(0), Slot(1, kv_mix=kv_mix, kv_path=NATIVE, fed=list(prompt), last_used=5)
        got, n = best_slot([other, slot], prompt, mix, NATIVE)
        assert n == reuse and (got is slot) == (reuse > 0), (kv_mix, mix)


REFUSED = [
    ("arrow:k=0", "k of arrow must be a whole number"),
    ("arrow:k=-2", "k of arrow must be a whole number"),
    ("arrow:k=2.5", "k must be a whole number"),
    ("arrow:k=x", "k must be a whole number"),
    ("spectr:k=65", "k of spectr must be a whole number from 1 to 64"),
    ("arrow:T=0", "T of arrow must be a finite number > 0"),
    ("arrow:T=-1", "T of arrow must be a finite number > 0"),
    ("arrow:T=nan", "T of arrow must be a finite number > 0"),
    ("arrow:T=inf", "T of arrow must be a finite number > 0"),
    ("arrow:T=warm", "T must be a finite number > 0"),
    ("spectr:T=1", "spectr takes no temperature"),
    ("spectr:k=2,T=0.5", "spectr takes no temperature"),
    ("arrow:temp=1", "unknown option 'temp=1' for arrow"),
    ("arrow:k", "unknown option 'k' for arrow"),
    ("arrow:k=2,k=3", "option k is given twice"),
    ("arrow:", "nothing after ':'"),
    ("arrow,navigate=1", "must be the whole mix"),
]


@pytest.mark.parametrize("spec,why", REFUSED)
def test_bad_routing_specs_are_refused_naming_the_input(spec, why):
    with pytest.raises(MixError) as err:
        Mix.parse(spec)
    assert why in str(err.value) and repr(spec) in str(err.value)


@pytest.mark.parametrize(
    "value,why",
    [
        ({"mode": "arrow", "k": 3.0}, "k of arrow must be a whole number"),
        ({"mode": "arrow", "k": True}, "k of arrow must be a whole number"),
        ({"mode": "arrow", "temperature": 0}, "T of arrow must be a finite number > 0"),
        ({"mode": "spectr", "temperature": 0.5}, "spectr takes no temperature"),
        ({"mode": "moe"}, "routing mode 'moe' is not one of arrow, spectr"),
        ({"mode": "arrow", "T": 1}, "unknown key(s) T"),
    ],
)
def test_bad_routed_json_mixes_are_refused(value, why):
    with pytest.raises(MixError, match=None) as err:
        Mix.coerce(value)
    assert why in str(err.value)


def test_routing_modes_are_not_adapter_names_and_not_routers():
    from loramux.router.registry import is_router_spec, register_router

    with pytest.raises(MixError, match="'arrow' is a routing mode"):
        Mix({"arrow": 1.0})
    with pytest.raises(MixError, match="'spectr' is a routing mode"):
        Mix.parse("spectr=0.5")
    with pytest.raises(MixError, match="no fixed weights"):
        Mix({"navigate": 1.0}, token_routing=TokenRouting())
    assert Mix({"mode": 0.5}).to_dict() == {"mode": 0.5}  # an adapter called "mode" is still a fixed mix
    for spec in ("arrow", "arrow:k=2", "spectr", "spectr:k=3"):
        assert not is_router_spec(spec)
    assert is_router_spec("logo") and is_router_spec("retrieval:keys.json")
    with pytest.raises(ValueError, match="routing mode"):
        register_router("arrow", lambda arg, pool: None, usage="arrow", summary="")


def test_cli_max_active_follows_a_routed_mix_and_help_teaches_the_modes():
    from loramux.cli.mix_choice import mix_help
    from loramux.cli.pool_args import max_active_for

    assert max_active_for(argparse.Namespace(mix="spectr", max_active=None)) == 4
    assert max_active_for(argparse.Namespace(mix="arrow", max_active=None)) == 3
    assert max_active_for(argparse.Namespace(mode="spectr:k=6", max_active=None)) == 6  # eval's --mix
    assert max_active_for(argparse.Namespace(mix="spectr", max_active=2)) == 2  # given: the pool refuses later
    assert max_active_for(argparse.Namespace(mix="navigate=1", max_active=None)) == 3
    text = mix_help()
    assert "arrow[:k=3,T=1]" in text and "spectr[:k=4]" in text


def test_server_selection_and_settings_take_the_modes():
    from loramux.server.errors import APIError
    from loramux.server.selection import LoraTable, MixSelector
    from loramux.server.settings import ServeSettings, SettingsError
    from loramux.token_routing import ROUTING_MODES

    sel = MixSelector(model_id="loramux", adapters=lambda: ["navigate"], mixes={}, lora=LoraTable(), routing_modes=ROUTING_MODES)
    assert sel.models() == ["loramux", "navigate", "arrow", "spectr", "logo-token"]
    for body, mix, source in [
        ({"model": "arrow"}, Mix.arrow(), "routed"),
        ({"model": "arrow:k=2,T=0.5"}, Mix.arrow(k=2, temperature=0.5), "routed"),
        ({"model": "spectr"}, Mix.spectr(), "routed"),
        ({"model": "navigate", "mix": "spectr:k=2"}, Mix.spectr(k=2), "mix"),
        ({"mix": {"mode": "arrow", "k": 1}}, Mix.arrow(k=1), "mix"),
    ]:
        got = sel.select(body, lambda: "")
        assert (got.mix, got.source) == (mix, source)
    with pytest.raises(APIError) as err:
        sel.select({"model": "arrow:k=0"}, lambda: "")
    assert (err.value.status, err.value.param, err.value.code) == (400, "model", "invalid_mix")
    with pytest.raises(SettingsError, match="reserved model name"):
        ServeSettings(adapters=[Path(".")], mixes={"arrow": Mix({"navigate": 1.0})}).check()


# --- the real pool --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, shared_dir) -> Path:
    folder = tmp_path_factory.mktemp("routing-adapters")
    for name in ADAPTERS:
        shutil.copytree(FIXTURES / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def pool(base_model, adapter_dir):
    from loramux import AdapterPool

    with AdapterPool(base_model, n_ctx=512, n_seq_max=4, max_active=4, n_threads=int(THREADS)) as p:
        if not p.native:
            from loramux import native

            native_missing(native.status().reason)
        p.load_adapters(adapter_dir)
        assert p.names == sorted(ADAPTERS)
        yield p


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    """One BBH dev row per adapter's task."""
    return {r["task"]: r for r in load_rows("dev", set(ADAPTERS), limit_per_task=1)}


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def alone(pool, tokens: list[int], mix, steps: int = STEPS) -> tuple[list[int], list[float]]:
    """Greedy tokens of ``tokens`` under ``mix`` alone, teacher-forced on the per-sequence path, and each step's top-two gap."""
    out, gaps = [], []
    for _ in range(steps):
        row = pool.logits(tokens + out, mix, path="native")[-1]
        top2 = np.sort(row)[-2:]
        out.append(int(np.argmax(row)))
        gaps.append(float(top2[1] - top2[0]))
    return out, gaps


def agree(pool, res, want: list[int], gaps: list[float], label: str) -> int:
    """How many steps of the result ``res`` (its tokens, then its end-of-turn token if it stopped) equal
    ``want`` before the first step where they may part (gap at or below the floor)."""
    for t, tok in enumerate(res.tokens):
        if tok != want[t]:
            assert gaps[t] <= GAP_FLOOR, f"{label} step {t}: {tok}, alone {want[t]} (gap {gaps[t]:.2f})"
            return t
    t = len(res.tokens)
    if res.finish_reason == "stop" and t < len(want):
        assert pool._engine.cx.is_eog(want[t]) or gaps[t] <= GAP_FLOOR, f"{label} stopped at step {t}, alone went on (gap {gaps[t]:.2f})"
        return t + 1
    return t


def test_arrow_differs_from_the_base_model_and_gives_the_same_answer_twice(pool, rows):
    from loramux.pool import PoolRequest

    req = PoolRequest(messages=chat(rows["boolean_expressions"]["input"]), mix="arrow", max_tokens=STEPS)
    tokens = pool.engine_request(req).tokens
    want, gaps = alone(pool, tokens, "arrow")
    base, _ = alone(pool, tokens, None)
    assert want != base
    pool.clear_prefix_cache()
    first, second = pool.generate([req]), pool.generate([req])  # the second reads its prompt from the prefix cache
    assert (first[0].cached_tokens, second[0].cached_tokens) == (0, len(tokens) - 1)
    for res in (first[0], second[0]):
        assert res.mix == {"mode": "arrow", "k": 3, "temperature": 1.0} and res.path == "native"
        assert agree(pool, res, want, gaps, "arrow") >= 2
    assert first[0].tokens == second[0].tokens or min(gaps) <= GAP_FLOOR
    assert first[0].text != pool.generate([PoolRequest(messages=req.messages, mix=None, max_tokens=STEPS)])[0].text


def test_a_batch_of_fixed_arrow_spectr_and_base_gives_each_what_it_gives_alone(pool, rows):
    from loramux.pool import PoolRequest

    mixes = [{"boolean_expressions": 0.7, "navigate": 0.3}, "arrow", "spectr", None]
    reqs = [PoolRequest(messages=chat(rows[t]["input"]), mix=m, max_tokens=STEPS) for t, m in zip(ADAPTERS, mixes)]
    pool.clear_prefix_cache()
    handles = [pool.submit(r) for r in reqs]
    results = [h.result(timeout=600) for h in handles]
    assert [h.max_step_sequences for h in handles] == [4] * 4  # the four decoded in one batch
    compared = 0
    for h, fin, mix in zip(handles, results, mixes):
        assert fin.mix == Mix.coerce(mix) and fin.path == "native"
        steps = len(fin.tokens) + (fin.finish_reason == "stop")
        want, gaps = alone(pool, list(h.request.tokens), mix, steps)
        compared += agree(pool, fin, want, gaps, str(fin.mix))
        if mix in ("arrow", "spectr"):  # the comparison tells the routed mix from the base model on this prompt
            assert alone(pool, list(h.request.tokens), None, steps)[0] != want
    assert compared >= 8


def test_the_prefix_cache_and_adapter_changes_respect_the_routing(pool, rows, adapter_dir):
    from loramux.pool import PoolRequest

    prompt = chat(rows["navigate"]["input"])

    def cached(mix) -> int:
        return pool.generate([PoolRequest(messages=prompt, mix=mix, max_tokens=1)])[0].cached_tokens

    pool.clear_prefix_cache()
    assert cached("arrow") == 0
    assert (cached(None), cached("arrow:k=2"), cached("spectr:k=3")) == (0, 0, 0)  # never the K/V of another mix
    assert cached("arrow") > 0 and cached("arrow:k=3,T=1") > 0  # the same routing: reused
    pool.load(FIXTURES / "snarks")  # the routing now runs over five adapters: its cached K/V is stale
    try:
        assert cached("arrow") == 0 and cached({"navigate": 1.0}) == 0
        assert cached({"navigate": 1.0}) > 0
    finally:
        pool.unload("snarks")
    assert cached("arrow") == 0 and cached({"navigate": 1.0}) > 0  # a fixed mix of kept adapters keeps its K/V


def test_token_choices_cover_every_adapted_weight_and_every_prompt_token(pool, rows, adapter_dir):
    import gguf

    groups: dict[str, set[str]] = {}  # base weight -> the adapters that adapt it
    for name in ADAPTERS:
        for t in gguf.GGUFReader(pool.adapters[name].gguf_path).tensors:
            if t.name.endswith(".lora_a"):
                groups.setdefault(t.name[: -len(".lora_a")], set()).add(name)
    assert {len(g) for g in groups.values()} == {2, 3, 4}  # mixed targets: k is capped per group
    tokens = pool.tokenize(rows["sports_understanding"]["input"], add_bos=True)
    for mix, k in [("arrow", 3), ("spectr", 4), (Mix.arrow(k=1), 1)]:
        report = pool.token_choices(tokens, mix)
        assert report.tokens == tuple(tokens) and report.mix == Mix.coerce(mix)
        assert "".join(report.pieces) == pool.detokenize(tokens) and "\x00" not in "".join(report.pieces)
        assert set(report.modules) == set(groups)
        assert sorted((c.module, c.pos) for c in report.choices) == sorted((m, p) for m in groups for p in range(len(tokens)))
        for c in report.choices:
            want_k = min(k, len(groups[c.module]))
            assert len(c.adapters) == want_k and len(set(c.adapters)) == want_k and set(c.adapters) <= groups[c.module]
            assert abs(sum(c.weights) - 1.0) < 1e-5 and min(c.weights) > 0
            if report.mix.token_routing.mode == "spectr":
                assert np.allclose(c.weights, 1.0 / want_k, atol=1e-6)
        if k < len(groups["blk.10.attn_q.weight"]):  # routed per token, not one choice for the prompt
            assert len({c.adapters for c in report.at("blk.10.attn_q.weight")}) > 1
    assert json.loads(json.dumps(report.to_json()))["mix"] == {"mode": "arrow", "k": 1, "temperature": 1.0}
    with pytest.raises(MixError, match="recorded for routed mixes"):
        pool.token_choices(tokens, {"navigate": 1.0})


def test_a_routed_mix_that_cannot_run_is_refused_never_run_as_the_base_model(pool, base_model):
    from loramux import AdapterPool

    with pytest.raises(MixError, match="above this pool's max_active=4"):
        pool.create_completion("not ( True ) is", mix="spectr:k=5", max_tokens=1)
    with pytest.raises(MixError, match="runs only as a per-sequence mix"):
        pool.logits(pool.tokenize("not ( True ) is"), "arrow")  # the context path cannot route
    with AdapterPool(base_model, n_ctx=64, n_seq_max=1, n_threads=int(THREADS)) as empty:
        with pytest.raises(MixError, match="no adapter is loaded"):
            empty.create_completion("not ( True ) is", mix="arrow", max_tokens=1)


NO_NATIVE = """
import json, sys
from loramux import AdapterPool
from loramux.errors import LoramuxError, MixError
with AdapterPool(sys.argv[1], n_ctx=64, n_seq_max=1, n_threads=1) as pool:
    pool.load(sys.argv[2])
    try:
        pool.create_completion("not ( True ) is", mix="arrow", max_tokens=1)
        print(json.dumps({"native": pool.native, "error": None}))
    except MixError as exc:
        print(json.dumps({"native": pool.native, "error": str(exc)}))
"""


def test_with_the_native_path_off_a_routed_mix_is_refused(tmp_path, base_model):
    env = dict(os.environ, LORAMUX_NATIVE="0")  # the patched library is loaded, its per-sequence path is off
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", NO_NATIVE, str(base_model), str(FIXTURES / "navigate")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["native"] is False
    assert "needs loramux's native library" in got["error"] and "arrow:k=3,T=1" in got["error"]


def test_eval_runs_a_routing_mode_and_reports_it(pool, rows):
    from loramux.evaluate import ROUTED, evaluate, top_adapter

    picked = [rows[t] for t in ADAPTERS[:2]]
    result = evaluate(pool, picked, "arrow:k=2,T=0.5", max_tokens=4)
    assert [r["mix"] for r in result.rows] == [{"mode": "arrow", "k": 2, "temperature": 0.5}] * 2
    assert result.extra["paths"] == {"native": 2}
    assert top_adapter(Mix.arrow()) == ROUTED
    with pytest.raises(MixError, match="max_active=4"):
        evaluate(pool, picked, "spectr:k=6", max_tokens=4)


def test_eval_records_what_each_tasks_question_and_answer_tokens_chose(pool, rows):
    """``evaluate(choice_rows=1)``: each task's map row is the mean routing weight per adapter over its
    question and answer tokens at q/v (where all four compete), as read off the raw record here; the
    answer's teacher-forced choices are generation's own (teacher forcing reproduces the answer)."""
    from loramux.eval_choices import template_head
    from loramux.evaluate import evaluate
    from loramux.pool import PoolRequest

    picked = [rows[t] for t in ADAPTERS]
    result = evaluate(pool, picked, "arrow", max_tokens=6, batched=False, choice_rows=1)
    m = result.choice_map
    assert m.tasks == tuple(ADAPTERS) and m.adapters == tuple(pool.names) and m.mix == Mix.arrow() and m.truncated == 0
    head = template_head(pool)
    for i, row in enumerate(picked):
        req = PoolRequest(messages=chat(row["input"]), mix="arrow", max_tokens=6)
        prompt = pool.engine_request(req).tokens
        answer = pool.generate([req])[0].tokens
        assert pool.detokenize(answer).strip() == result.rows[i]["answer"].strip()
        assert prompt[: len(head)] == head and len(head) >= 3  # the template's fixed head is left out
        logits = pool.logits(prompt + answer, "arrow", path="native")
        for t, tok in enumerate(answer):  # teacher-forced under Arrow, the answer is its own greedy choice
            row_logits = logits[len(prompt) - 1 + t]
            gap = float(np.sort(row_logits)[-1] - np.sort(row_logits)[-2])
            assert int(np.argmax(row_logits)) == tok or gap <= GAP_FLOOR, (row["task"], t)
        want = np.zeros(len(pool.names))
        n = 0
        for c in pool.token_choices(prompt + answer, "arrow").choices:
            if c.pos >= len(head) and c.module.endswith((".attn_q.weight", ".attn_v.weight")):
                n += 1
                for name, w in zip(c.adapters, c.weights):
                    want[pool.names.index(name)] += w
        assert n == 2 * pool.n_layer * (len(prompt) + len(answer) - len(head))
        np.testing.assert_allclose(m.share[i], want / n, atol=1e-5)
        assert abs(m.share[i].sum() - 1.0) < 1e-5 and m.tokens[row["task"]] == len(prompt) + len(answer) - len(head)
    ranks = [m.own_rank(t) for t in ADAPTERS]
    assert all(1 <= r <= len(ADAPTERS) for r in ranks)
    got = json.loads(json.dumps(result.to_json()))["token_choices"]
    assert got["weights"] == ["attn_q", "attn_v"] and [got["tasks"][t]["own_rank"] for t in ADAPTERS] == ranks
    assert f"{ADAPTERS[0]}: own adapter #{ranks[0]} of 4" in m.summary()
    with pytest.raises(MixError, match="per-token routing"):
        evaluate(pool, picked[:1], "oracle", max_tokens=2, choice_rows=1)
    with pytest.raises(LoramuxError, match="no routed base weight of kind attn_x; the routed kinds are attn_k, attn_output, attn_q"):
        evaluate(pool, picked[:1], "arrow", max_tokens=2, choice_rows=1, choice_weights=["attn_x"])


def test_the_choice_map_draws_tasks_by_adapters_with_each_own_adapter_outlined():
    import xml.etree.ElementTree as ET

    from loramux.eval_choices import TaskChoiceMap

    share = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    m = TaskChoiceMap(Mix.arrow(), ("attn_q",), ("a", "zz"), ("a", "b", "c"), share, {"a": 10, "zz": 12})
    assert m.own_rank("a") == 1 and m.own_rank("zz") is None
    assert m.summary().splitlines()[-1] == "own adapter in the top 3 for 1 of 1 tasks; median rank 1"
    svg = ET.fromstring(m.heatmap().svg())
    rects = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect")]
    assert len([r for r in rects if r.get("fill") != "none"]) == 6 and len([r for r in rects if r.get("stroke") == "red"]) == 1
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert {"a", "zz", "b", "c"} <= set(texts) and any("arrow:k=3,T=1" in t for t in texts)


def loramux_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"} | {"LORAMUX_THREADS": THREADS}
    return subprocess.run(
        [sys.executable, "-m", "loramux", *args], input=stdin, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_cli_run_and_chat_take_the_modes(pool, adapter_dir, base_model, rows):
    from loramux.pool import PoolRequest

    prompt = rows["hyperbaton"]["input"]
    common = ("--base", str(base_model), "--adapters", str(adapter_dir), "--n-ctx", "512")
    run = loramux_cli("run", *common, "--mix", "spectr", "--max-tokens", "6", prompt)  # top-4: max_active follows
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[mix: spectr:k=4]" in run.stderr
    tokens = pool.engine_request(PoolRequest(messages=chat(prompt))).tokens
    want, gaps = alone(pool, tokens, "spectr", 6)
    assert alone(pool, tokens, None, 6)[0] != want  # the check below tells SpectR from the base model
    sure = next((t for t, g in enumerate(gaps) if g <= GAP_FLOOR), len(want))  # steps the floor cannot flip
    end = next((t for t in range(sure) if pool._engine.cx.is_eog(want[t])), None)
    if end is not None:
        assert end >= 1 and run.stdout == pool.detokenize(want[:end]) + "\n"
    else:
        assert sure >= 1 and run.stdout.startswith(pool.detokenize(want[:sure]))
    talk = loramux_cli("chat", *common, "--mix", "arrow", "--max-tokens", "3", stdin="/mix\n/mix spectr:k=2\nhello\n/mix arrow:k=9\n")
    assert talk.returncode == 0, talk.stderr[-3000:]
    assert "(mix: arrow:k=3,T=1)" in talk.stdout and "(mix: spectr:k=2)" in talk.stdout
    assert "error: mix arrow:k=9,T=1: top-k 9 is above this pool's max_active=3" in talk.stdout  # refused at /mix


def test_cli_eval_choices_prints_the_ranks_and_writes_the_map_and_json(pool, adapter_dir, base_model, rows, tmp_path):
    import xml.etree.ElementTree as ET

    data = write_rows(tmp_path / "rows.jsonl", [rows["navigate"], rows["hyperbaton"]])
    common = ("--base", str(base_model), "--adapters", str(adapter_dir), "--n-ctx", "512", "--data", str(data), "--max-tokens", "3")
    out = loramux_cli("eval", *common, "--mix", "arrow:k=2", "--choices", str(tmp_path / "map.svg"), "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((tmp_path / "r.json").read_text())["token_choices"]
    assert list(got["tasks"]) == ["navigate", "hyperbaton"] and got["mix"] == {"mode": "arrow", "k": 2, "temperature": 1.0}
    for task, entry in got["tasks"].items():
        assert f"{task}: own adapter #{entry['own_rank']} of 4" in out.stdout
        assert abs(sum(entry["share"].values()) - 1.0) < 1e-3 and entry["tokens"] > 10
    assert ET.parse(tmp_path / "map.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    refused = loramux_cli("eval", *common, "--mix", "oracle", "--choices", str(tmp_path / "no.svg"))
    assert refused.returncode != 0 and "per-token routing" in refused.stderr and not (tmp_path / "no.svg").exists()


# --- the server (openai client) and the hook in front of a stock llama-server --------------------


def test_a_routed_request_arriving_during_a_load_is_not_refused(pool, tmp_path):
    """Loads re-register the pool on the engine thread; routed requests submitted meanwhile from
    another thread are judged by a whole registration, never by the moment between two (which
    refused them with "no adapter is loaded")."""
    import threading
    import time

    from loramux.pool import PoolRequest

    extra = FIXTURES / "snarks"
    loading = threading.Event()

    def loader() -> None:
        loading.set()
        for _ in range(3):
            pool.load(extra, name="extra")
            pool.unload("extra")
        loading.clear()

    thread = threading.Thread(target=loader)
    thread.start()
    loading.wait(10)
    submitted, refused = 0, []
    while thread.is_alive():
        try:
            pool.submit(PoolRequest(prompt="not ( True ) and ( True ) is", mix="arrow:k=2", max_tokens=1)).cancel()
            submitted += 1
        except MixError as exc:
            refused.append(str(exc))
        time.sleep(0.002)
    thread.join()
    assert submitted + len(refused) >= 20, "too few requests arrived during the loads to say anything"
    assert not refused, f"{len(refused)} of {submitted + len(refused)} routed requests refused during a load: {refused[0]}"


@pytest.fixture(scope="module")
def server(pool, adapter_dir, base_model, tmp_path_factory):
    from serve_proc import loramux_server

    log_dir = tmp_path_factory.mktemp("routing-serve")
    args = ("--base", str(base_model), "--adapters", str(adapter_dir), "--n-seq-max", "2", "--n-ctx", "512", "--threads", THREADS)
    with loramux_server(*args, "--flash-attn", "off", log_dir=log_dir) as url:  # flash off: the pool's numerics
        yield url


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_the_server_routes_per_token_for_model_arrow_and_spectr(pool, client, rows):
    from loramux.pool import PoolRequest

    listed = [m.id for m in client.models.list().data]
    assert "arrow" in listed and "spectr" in listed
    messages = chat(rows["hyperbaton"]["input"])  # first-step gaps 3.3-4.3 under these three mixes
    tokens = pool.engine_request(PoolRequest(messages=messages)).tokens
    base, _ = alone(pool, tokens, None)
    for model, echo in [
        ("arrow", {"mode": "arrow", "k": 3, "temperature": 1.0}),
        ("spectr", {"mode": "spectr", "k": 4, "temperature": None}),  # the server's max_active (4) runs SpectR's top-4
        ("arrow:k=2,T=0.5", {"mode": "arrow", "k": 2, "temperature": 0.5}),
    ]:
        out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=STEPS)
        assert out.model_extra["mix"] == echo and out.model_extra["mix_source"] == "routed" and out.model == model
        want, gaps = alone(pool, tokens, echo)
        assert base != want  # the check below tells the routed mix from the base model
        sure = next((t for t, g in enumerate(gaps) if g <= GAP_FLOOR), len(want))
        end = next((t for t in range(sure) if pool._engine.cx.is_eog(want[t])), None)
        text = out.choices[0].message.content
        if end is not None:
            assert end >= 1 and text == pool.detokenize(want[:end]), model
        else:
            assert sure >= 1 and text.startswith(pool.detokenize(want[:sure])), model


def test_the_server_takes_a_routed_body_mix_streams_it_and_refuses_what_cannot_run(client, server):
    import httpx
    import jsonschema_rs

    stream = client.completions.create(
        model="loramux", prompt="not ( True ) and ( True ) is", max_tokens=3, temperature=0, stream=True, extra_body={"mix": "spectr:k=2"}
    )
    chunks = list(stream)
    assert chunks and all(c.model_extra["mix"] == {"mode": "spectr", "k": 2, "temperature": None} for c in chunks)
    openai = pytest.importorskip("openai")
    for kwargs, param, why in [
        ({"model": "spectr:k=5"}, "mix", "above this pool's max_active=4"),
        ({"model": "arrow:T=0"}, "model", "T of arrow must be a finite number > 0"),
        ({"model": "loramux", "extra_body": {"mix": {"mode": "spectr", "temperature": 2}}}, "mix", "spectr takes no temperature"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(prompt="x", max_tokens=1, **kwargs)
        body = err.value.body
        assert (body["param"], body["code"]) == (param, "invalid_mix") and why in body["message"], body
    schema = httpx.get(f"{server}/openapi.json").json()["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    valid = jsonschema_rs.validator_for(schema["schema"])
    for body, ok in [
        ({"prompt": "x", "model": "arrow:k=2,T=0.5"}, True),
        ({"prompt": "x", "mix": "spectr"}, True),
        ({"prompt": "x", "mix": {"mode": "arrow", "k": 2, "temperature": 0.5}}, True),
        ({"prompt": "x", "mix": {"navigate": 0.5}}, True),
        ({"prompt": "x", "mix": {"mode": "moe"}}, False),
        ({"prompt": "x", "mix": {"mode": "arrow", "k": 0}}, False),
        ({"prompt": "x", "mix": {"mode": "arrow", "T": 1}}, False),
    ]:
        assert valid.is_valid(body) == ok, body


@pytest.fixture(scope="module")
def hook(pool, base_model, tmp_path_factory):
    from llama_server import llama_server_binary, running_llama_server
    from serve_proc import loramux_server

    folder = tmp_path_factory.mktemp("routing-hook")
    files = [shutil.copy(pool.adapters[n].gguf_path, folder / f"{n}.gguf") for n in ADAPTERS[:2]]
    llama_server_binary()  # builds once (cached under $LORAMUX_HOME)
    with running_llama_server(base_model, [Path(f) for f in files], n_parallel=1, n_ctx=512, threads=int(THREADS)) as upstream:
        with loramux_server("--upstream", upstream, "--base", str(base_model), log_dir=folder) as url:
            yield url


def test_the_hook_refuses_per_token_routing_with_a_400(hook):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{hook}/v1", api_key="unused", max_retries=0)
    listed = [m.id for m in client.models.list().data]
    assert ADAPTERS[0] in listed and "arrow" not in listed and "spectr" not in listed
    for kwargs, param in [({"model": "arrow"}, "model"), ({"model": "spectr:k=2"}, "model"), ({"extra_body": {"mix": "arrow"}}, "mix")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(prompt="not ( True ) is", max_tokens=1, **{"model": "loramux", **kwargs})
        body = err.value.body
        assert (body["param"], body["code"], body["type"]) == (param, "invalid_mix", "invalid_request_error")
        assert "cannot route per token" in body["message"]
    out = client.completions.create(model=ADAPTERS[0], prompt="not ( True ) is", max_tokens=2, temperature=0)  # a fixed mix goes through
    assert out.model_extra["mix"] == {ADAPTERS[0]: 1.0} and out.choices[0].text
