"""The engine under concurrent load, on the real model and fixtures.

Oracle: every answer of a concurrent load is compared, token by token, with the same request run
alone through the same engine. Greedy tokens may part only at a step whose top-two logit gap (of
the request alone, teacher-forced on the same path) is at or below the batch floor
(GAP_FLOOR, tests/test_native_oracle.py's MAX_ABS_TOL), where llama.cpp's batch non-invariance
can flip an argmax; at least MIN_COMPARED steps must be compared in all.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from loramux.engine import Finished, SamplingParams, TokenEvent
from loramux.errors import QueueFullError, RequestCancelled
from loramux.pool import AdapterPool, PoolRequest

from conftest import BATCH_ADAPTERS, BATCH_MIXES, FIXTURES, GAP_FLOOR, batch_conversations, open_batch_pool

ADAPTERS, MIXES = BATCH_ADAPTERS, BATCH_MIXES
STEPS = 12


@pytest.fixture(scope="module")
def pool(base_model, shared_dir):
    with open_batch_pool(base_model) as p:
        yield p


@pytest.fixture(scope="module")
def prompts():
    return batch_conversations()


def no_eos(pool) -> dict[int, float]:
    return {pool.token_eos(): -1e9, **{t: -1e9 for t in pool.tokenize("<|im_end|>")}}


def events(handle) -> tuple[list[int], str, Finished]:
    toks, text, fin = [], "", None
    for ev in handle:
        if isinstance(ev, TokenEvent):
            toks.append(ev.token)
            text += ev.text
        else:
            fin = ev
            text += ev.tail
    return toks, text, fin


def compare_with_alone(pool, prompt_tokens, mix, got, alone) -> int:
    """Steps compared; fails where the tokens part at a gap above the floor."""
    path = pool.path_for(mix)
    for t, (a, b) in enumerate(zip(got, alone)):
        if a != b:
            row = pool.logits(prompt_tokens + alone[:t], mix, path=path)[-1]
            top2 = np.sort(row)[-2:]
            assert top2[1] - top2[0] <= GAP_FLOOR, f"mix {mix} step {t}: {a} beside others, {b} alone (gap {top2[1] - top2[0]:.2f})"
            return t
    assert len(got) == len(alone) or min(len(got), len(alone)) >= STEPS
    return min(len(got), len(alone))


def test_concurrent_streams_from_threads_equal_each_request_alone(pool, prompts):
    reqs = [PoolRequest(messages=m, mix=mix, max_tokens=STEPS) for m, mix in zip(prompts, MIXES)]
    alone = [events(pool.submit(r)) for r in reqs]
    got: dict[int, tuple] = {}

    def client(i):
        got[i] = events(pool.submit(reqs[i]))

    steps0, seqs0 = pool.stats.steps, pool.stats.step_sequences
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(got) == len(reqs)
    mean_seqs = (pool.stats.step_sequences - seqs0) / max(1, pool.stats.steps - steps0)
    assert mean_seqs > 1.5, f"the concurrent requests did not share decodes ({mean_seqs:.2f} sequences per step)"
    compared = 0
    for i, r in enumerate(reqs):
        tokens = pool.engine_request(r).tokens
        compared += compare_with_alone(pool, tokens, pool.resolve_mix(r.mix), got[i][0], alone[i][0])
        assert got[i][2].mix == pool.resolve_mix(MIXES[i]) and got[i][2].path == pool.path_for(MIXES[i])
        if got[i][0] == alone[i][0]:
            assert got[i][1] == alone[i][1]
    assert compared >= 2 * len(reqs), f"only {compared} steps compared"


def test_a_shared_prefix_under_another_mix_is_never_reused(pool, prompts):
    conv = prompts[1]
    mix_a, mix_b = {"navigate": 1.0}, {"hyperbaton": 1.0}
    greedy = SamplingParams(temperature=0, logit_bias=no_eos(pool))  # no early end: STEPS tokens to compare

    def req(mix):
        return PoolRequest(messages=conv, mix=mix, max_tokens=STEPS, sampling=greedy)

    pool.clear_prefix_cache()
    alone_b = events(pool.submit(req(mix_b)))
    pool.clear_prefix_cache()
    alone_a = events(pool.submit(req(mix_a)))  # leaves K/V under mix_a
    ha, hb = pool.submit(req(mix_a)), pool.submit(req(mix_b))
    got_a, got_b = events(ha), events(hb)
    assert got_b[2].cached_tokens == 0, "K/V computed under another mix was reused"
    assert got_a[2].cached_tokens > 0, "the same mix should reuse its cached prefix"
    tokens = pool.engine_request(PoolRequest(messages=conv)).tokens
    assert compare_with_alone(pool, tokens, pool.resolve_mix(mix_a), got_a[0], alone_a[0]) >= 4
    assert compare_with_alone(pool, tokens, pool.resolve_mix(mix_b), got_b[0], alone_b[0]) >= 4


def test_a_request_arriving_during_a_running_one_joins_its_decodes(pool):
    ban = no_eos(pool)
    long = pool.submit(
        PoolRequest(prompt="Once upon a time", mix={"navigate": 1.0}, max_tokens=40, sampling=SamplingParams(temperature=0, logit_bias=ban))
    )
    it = iter(long)
    for _ in range(3):
        next(it)
    late = pool.submit(
        PoolRequest(
            prompt="The capital of France is", mix={"snarks": 1.0}, max_tokens=4, sampling=SamplingParams(temperature=0, logit_bias=ban)
        )
    )
    fin = late.result(120)
    assert not long.done, "the long request should still be running"
    assert late.joined_step > long.joined_step and late.max_step_sequences == 2
    assert fin.completion_tokens == 4
    rest = list(it)
    assert isinstance(rest[-1], Finished) and rest[-1].completion_tokens == 40


def test_cancelling_a_stream_frees_its_sequence_at_once(pool):
    import llama_cpp

    cancelled = pool.stats.cancelled
    stream = pool.create_completion("Once upon a time", max_tokens=200, temperature=0, logit_bias=no_eos(pool), stream=True)
    next(stream)
    next(stream)
    stream.close()  # a client going away
    deadline = time.time() + 30
    while pool._engine._running() and time.time() < deadline:
        time.sleep(0.01)
    assert not pool._engine._running() and pool.stats.cancelled == cancelled + 1
    mem = llama_cpp.llama_get_memory(pool._engine.cx.ctx)
    held = [s.seq_id for s in pool._engine._slots if s.kv_mix is None]
    assert held and all(llama_cpp.llama_memory_seq_pos_max(mem, s) == -1 for s in held)


def test_a_full_queue_is_refused_and_a_cancelled_waiter_never_runs(base_model):
    with AdapterPool(base_model, n_ctx=256, n_seq_max=1, max_queue=1) as p:
        ban = no_eos(p)
        slow = SamplingParams(temperature=0, logit_bias=ban)
        running = p.submit(PoolRequest(prompt="Once upon a time", max_tokens=60, sampling=slow))
        next(iter(running))
        waiting = p.submit(PoolRequest(prompt="Hello", max_tokens=2, sampling=slow))
        with pytest.raises(QueueFullError, match="max_queue=1"):
            p.submit(PoolRequest(prompt="Hi", max_tokens=2))
        waiting.cancel()
        with pytest.raises(RequestCancelled):
            waiting.result(60)
        assert running.result(120).completion_tokens == 60
        assert p.stats.rejected == 1


def test_adapters_loaded_and_unloaded_during_traffic_leave_running_requests_untouched(pool, prompts):
    ban = no_eos(pool)
    mixes = [{"navigate": 1.0}, {"snarks": 0.5, "hyperbaton": 0.5}]
    reqs = [
        PoolRequest(messages=prompts[i], mix=m, max_tokens=24, sampling=SamplingParams(temperature=0, logit_bias=ban))
        for i, m in enumerate(mixes)
    ]
    alone = [events(pool.submit(r)) for r in reqs]
    handles = [pool.submit(r) for r in reqs]
    first = next(iter(handles[0]))  # the requests are running
    pool.load(FIXTURES / "dyck_languages")  # registered between two steps
    unloader = threading.Thread(target=pool.unload, args=("snarks",))  # waits for the request that uses it
    unloader.start()
    got = [events(h) for h in handles]
    got[0] = ([first.token] + got[0][0], first.text + got[0][1], got[0][2])
    unloader.join(120)
    assert "snarks" not in pool.names and "dyck_languages" in pool.names
    for r, g, a in zip(reqs, got, alone):
        tokens = pool.engine_request(r).tokens if r.mix != {"snarks": 0.5, "hyperbaton": 0.5} else None
        if tokens is not None:
            assert compare_with_alone(pool, tokens, pool.resolve_mix(r.mix), g[0], a[0]) >= 4
        else:  # its adapter is gone: the oracle is the answer it gave alone before, exactly or up to the floor
            assert g[0][:4] == a[0][:4] and g[2].completion_tokens == 24
    out = pool.create_completion("[ ( [", mix={"dyck_languages": 1.0}, temperature=0, max_tokens=3)
    assert out["mix"] == {"dyck_languages": 1.0}
    pool.load(FIXTURES / "snarks")  # back for the other tests


def test_sampling_means_what_llama_cpp_python_means(pool):
    """Same prompt, sampling parameters and seed: the same text as llama_cpp.Llama.create_completion."""
    import llama_cpp

    args = dict(max_tokens=24, temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=1234)
    prompt = "Write a sentence about the sea:"
    ours = pool.create_completion(prompt, **args)["choices"][0]["text"]
    assert ours == pool.create_completion(prompt, **args)["choices"][0]["text"]  # seeded: reproducible
    assert ours != pool.create_completion(prompt, **(args | {"seed": 99}))["choices"][0]["text"]
    llm = llama_cpp.Llama(model_path=str(pool.base_path), n_ctx=512, n_threads=pool.n_threads, verbose=False)
    try:
        theirs = llm.create_completion(prompt, **args)["choices"][0]["text"]
    finally:
        llm.close()
    assert ours == theirs


def test_stop_strings_cut_the_text_and_the_stream_never_shows_them(pool):
    whole = pool.create_completion("1, 2, 3, 4,", temperature=0, max_tokens=16)["choices"][0]["text"]
    stop = whole.strip()[:3] if len(whole.strip()) >= 3 else whole
    assert stop
    cut = pool.create_completion("1, 2, 3, 4,", temperature=0, max_tokens=16, stop=[stop])
    chunks = [
        c["choices"][0]["text"] for c in pool.create_completion("1, 2, 3, 4,", temperature=0, max_tokens=16, stop=[stop], stream=True)
    ]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert whole.startswith(cut["choices"][0]["text"]) and stop not in cut["choices"][0]["text"]
    assert "".join(chunks) == cut["choices"][0]["text"] and not any(stop in c for c in chunks)


def test_asyncio_clients_get_the_same_answer(pool):
    req = PoolRequest(prompt="The capital of France is", mix={"navigate": 1.0}, max_tokens=8)
    want = events(pool.submit(req))

    async def main():
        loop = asyncio.get_running_loop()
        handles = [pool.submit(req, loop=loop) for _ in range(3)]
        outs = []
        for h in handles:
            toks = [ev.token async for ev in h if isinstance(ev, TokenEvent)]
            outs.append(toks)
        return outs

    for toks in asyncio.run(main()):
        assert toks[:4] == want[0][:4]


@pytest.mark.parametrize("field", ["prompt", "logit_bias"])
def test_a_token_id_outside_the_vocabulary_fails_only_its_own_request(pool, prompts, field):
    """Three good requests running, a fourth with id 10,000,000 (in its prompt, or in logit_bias) is
    refused at Engine.submit, naming the field; the three finish with their alone answers.
    (Before the check lived at the engine's door, the bad id reached llama_decode and failed the
    whole step: all four requests.)"""
    from loramux.errors import RequestError

    good = [PoolRequest(messages=m, mix=mix, max_tokens=STEPS) for m, mix in zip(prompts[:3], MIXES[:3])]
    alone = [events(pool.submit(r)) for r in good]
    handles = [pool.submit(r) for r in good]
    if field == "prompt":
        bad = PoolRequest(prompt=[1, 2, 10_000_000], max_tokens=STEPS)
    else:
        bad = PoolRequest(messages=prompts[3], max_tokens=STEPS, sampling=SamplingParams(logit_bias={10_000_000: 1.0}))
    with pytest.raises(RequestError, match="outside the vocabulary") as refused:
        pool.submit(bad)
    assert refused.value.param == field
    for r, h, (toks, _, _) in zip(good, handles, alone):
        got = events(h)
        assert got[2].finish_reason in ("length", "stop"), f"a good request ended with {got[2].finish_reason}"
        compare_with_alone(pool, pool.engine_request(r).tokens, pool.resolve_mix(r.mix), got[0], toks)


def test_n_choices_read_the_prompt_once_and_each_equals_its_seed_alone(pool, prompts):
    """OpenAI's ``n``: one sequence reads the prompt, the others copy its K/V (all but the last
    prompt token) before their first step; each choice equals the same request alone with its seed."""
    mix = MIXES[1]
    req = PoolRequest(messages=prompts[0], mix=mix, max_tokens=STEPS, sampling=SamplingParams(temperature=0.9, seed=5))
    pool.clear_prefix_cache()
    got = [h.result(120) for h in pool.submit_choices(req, 3)]
    n_prompt = got[0].prompt_tokens
    assert [f.cached_tokens for f in got[1:]] == [n_prompt - 1, n_prompt - 1]  # copied, not read again
    assert got[0].cached_tokens == 0
    for i, fin in enumerate(got):
        pool.clear_prefix_cache()
        alone = pool.submit(
            PoolRequest(messages=prompts[0], mix=mix, max_tokens=STEPS, sampling=SamplingParams(temperature=0.9, seed=5 + i))
        )
        assert alone.result(120).tokens == fin.tokens, f"choice {i}"
    assert len({f.tokens for f in got}) > 1  # different draws (a wrong seed would be caught above)
    pool.clear_prefix_cache()
    cancelled = pool.submit_choices(req, 2)
    cancelled[0].cancel()  # the leader goes away before the others copied its K/V: they read the prompt themselves
    assert cancelled[1].result(120).tokens == got[1].tokens


def test_the_python_api_answers_n_choices_as_the_server_does(pool):
    """``create_completion(n=3)``: three choices, each the request alone with ``seed + i``; streamed,
    the chunks of each choice (by ``index``) make the same texts."""
    kw = dict(mix=MIXES[0], max_tokens=8, temperature=0.9, seed=21, logit_bias=no_eos(pool))
    out = pool.create_completion("The weather today is", n=3, **kw)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and out["usage"]["completion_tokens"] == 24
    alone = [pool.create_completion("The weather today is", **(kw | {"seed": 21 + i}))["choices"][0]["text"] for i in range(3)]
    assert [c["text"] for c in out["choices"]] == alone
    chunks = list(pool.create_completion("The weather today is", n=3, stream=True, **kw))
    streamed = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)]
    assert streamed == alone and sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 3
