"""Logit-level oracles on the real model: the pool's mixes against llama.cpp driven directly.

Teacher-forced on a short chat prompt plus an answer, every position's full logit vector is
compared. Stock llama.cpp is deterministic for the same context parameters and batch shape:
measured here, the pool and the direct references agree bitwise (max |diff| = 0.0, logits up to
~40), while each adapter moves the logits by 10-20. TOL leaves room for a different SIMD path
without letting a wrong scale or a missing adapter through.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from loramux.errors import LoramuxError
from loramux.llama_runtime import decode_logits
from loramux.pool import AdapterPool

from conftest import FIXTURES

TOL = 1e-3
ADAPTERS = ["boolean_expressions", "dyck_languages", "navigate"]  # q/k/v/o r8; rsLoRA q/v r16; all seven r4
CTX = dict(n_ctx=512, n_batch=512)


@pytest.fixture(scope="module")
def pool(base_model):
    with AdapterPool(base_model, logits_all=True, **CTX) as p:
        for name in ADAPTERS:
            p.load(FIXTURES / name)
        yield p


@pytest.fixture(scope="module")
def tokens(pool):
    prompt = pool.chat_prompt([{"role": "user", "content": "not ( True ) and ( False ) or True is"}])
    return pool.tokenize(prompt + "True")


def reference_logits(pool, tokens, loras):
    """llama.cpp alone: a plain llama_cpp.Llama with adapters set through the raw bindings."""
    import llama_cpp

    threads = pool.llama.n_threads
    llm = llama_cpp.Llama(model_path=str(pool.base_path), n_threads=threads, n_threads_batch=threads, verbose=False, **CTX)
    handles = []
    try:
        for path, scale in loras:
            h = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
            assert h, f"llama.cpp refused {path}"
            handles.append((h, scale))
        if handles:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*[h for h, _ in handles])
            scales = (ctypes.c_float * len(handles))(*[s for _, s in handles])
            assert llama_cpp.llama_set_adapters_lora(llm.ctx, arr, len(handles), scales) == 0
        return decode_logits(llm.ctx, tokens, llm.n_vocab())
    finally:
        for h, _ in handles:
            llama_cpp.llama_adapter_lora_free(h)
        llm.close()


def gguf(pool, name):
    return pool.adapters[name].gguf_path


def test_empty_mix_equals_the_base_model(pool, tokens):
    assert pool.names == sorted(ADAPTERS)
    pool.logits(tokens, {"navigate": 1.0})  # leave another mix set first: the pool must clear it
    got = pool.logits(tokens, {})
    np.testing.assert_allclose(got, reference_logits(pool, tokens, []), rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ADAPTERS)
def test_one_hot_mix_equals_the_adapter_loaded_alone(pool, tokens, name, base_model):
    import llama_cpp

    got = pool.logits(tokens, {name: 1.0})
    # the stock way to run one adapter: Llama(lora_path=...)
    llm = llama_cpp.Llama(model_path=str(base_model), lora_path=str(gguf(pool, name)), n_threads=pool.llama.n_threads,
                          n_threads_batch=pool.llama.n_threads, verbose=False, **CTX)
    try:
        want = decode_logits(llm.ctx, tokens, llm.n_vocab())
    finally:
        llm.close()
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    base = pool.logits(tokens, None)
    assert np.abs(got - base).max() > 1.0, f"{name} at weight 1 barely moves the logits: is it applied?"


def test_half_half_mix_equals_llama_cpp_with_both_at_half(pool, tokens):
    a, b = "boolean_expressions", "dyck_languages"
    got = pool.logits(tokens, {a: 0.5, b: 0.5})
    want = reference_logits(pool, tokens, [(gguf(pool, a), 0.5), (gguf(pool, b), 0.5)])
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    only_a = reference_logits(pool, tokens, [(gguf(pool, a), 0.5)])
    assert np.abs(got - only_a).max() > 0.5, "the second adapter of the mix has no effect"


def test_weights_other_than_one_reach_llama_cpp(pool, tokens):
    name = "navigate"
    for w in (2.0, -0.75):
        got = pool.logits(tokens, {name: w})
        np.testing.assert_allclose(got, reference_logits(pool, tokens, [(gguf(pool, name), w)]), rtol=0, atol=TOL)


def test_streaming_and_non_streaming_give_the_same_text(pool):
    mixes = [{}, {"boolean_expressions": 1.0}, {"boolean_expressions": 0.5, "navigate": 0.5}]
    for mix in mixes:
        msgs = [{"role": "user", "content": "not ( False or True ) and True is"}]
        whole = pool.create_chat_completion(msgs, mix=mix, temperature=0, max_tokens=24)
        chunks = list(pool.create_chat_completion(msgs, mix=mix, temperature=0, max_tokens=24, stream=True))
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert whole["choices"][0]["message"]["content"] == streamed
        assert whole["mix"] == mix and all(c["mix"] == mix for c in chunks)
        text = pool.create_completion("The capital of France is", mix=mix, temperature=0, max_tokens=12)
        text_stream = "".join(c["choices"][0]["text"] for c in pool.create_completion(
            "The capital of France is", mix=mix, temperature=0, max_tokens=12, stream=True))
        assert text["choices"][0]["text"] == text_stream


def test_a_mix_change_never_reuses_the_cached_prompt(pool, tokens):
    """Same prompt twice, base then an adapter: the second answer's first logprob must be the adapter's own.

    llama-cpp-python reuses the longest cached prefix between calls; K/V computed under the base
    model would give a different logprob (measured: -0.376 instead of -0.331 here).
    """
    prompt = pool.detokenize(tokens[:-1])
    mix = {"boolean_expressions": 1.0}
    pool.create_completion(prompt, mix=None, temperature=0, max_tokens=3)
    out = pool.create_completion(prompt, mix=mix, temperature=0, max_tokens=3, logprobs=1)
    first_lp = float(out["choices"][0]["logprobs"]["token_logprobs"][0])
    first_tok = pool.tokenize(out["choices"][0]["logprobs"]["tokens"][0])[0]
    logits = pool.logits(tokens[:-1], mix)[-1].astype(np.float64)
    want = logits[first_tok] - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    assert abs(first_lp - want) < TOL


def test_unchanged_mix_makes_no_llama_set_adapters_lora_call(pool):
    prompt = "Hello"
    pool.create_completion(prompt, mix={"navigate": 1.0}, temperature=0, max_tokens=1)
    calls = pool.stats.lora.set_calls
    pool.create_completion(prompt, mix={"navigate": 1.0}, temperature=0, max_tokens=1)
    pool.create_completion(prompt, mix="navigate=1.0,dyck_languages=0", temperature=0, max_tokens=1)  # zero weight = absent
    assert pool.stats.lora.set_calls == calls
    pool.create_completion(prompt, mix={"navigate": 0.5}, temperature=0, max_tokens=1)
    assert pool.stats.lora.set_calls == calls + 1
    assert pool.active_mix == {"navigate": 0.5}


def test_an_open_stream_blocks_a_second_request_in_its_thread(pool):
    stream = pool.create_completion("Once upon a time", mix={}, temperature=0, max_tokens=8, stream=True)
    next(stream)
    with pytest.raises(LoramuxError, match="still open"):
        pool.create_completion("Hi", temperature=0, max_tokens=1)
    stream.close()
    assert pool.create_completion("Hi", temperature=0, max_tokens=1)["mix"] == {}
