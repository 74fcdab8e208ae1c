"""The pool's batched path (AdapterPool.generate / create_completions / create_chat_completions).

Oracle: each request of a native batch against the same request run alone through stock llama.cpp
(``pool.logits``: the mix set on the whole context with ``llama_set_adapters_lora``), greedy, teacher-forced to get the
top-two logit gap of every step. Greedy tokens must agree step by step; they may part only at a
step whose gap is at or below the batch floor documented in test_native_oracle.py
(MAX_ABS_TOL = 2.0), where llama.cpp's own batch non-invariance can flip the argmax (the texts
are not compared after that). Measured: all 6 requests identical to stock, 23 tokens.

The native cases skip when the native library is not in use in this process, unless
LORAMUX_REQUIRE_NATIVE=1; the fallback (library missing: every mix on the whole context, one mix
per decode, in the same engine) runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loramux.errors import ContextLengthError, LoramuxError, MixError, RequestError
from loramux.pool import PoolRequest

from conftest import BATCH_ADAPTERS, BATCH_MIXES, FIXTURES, GAP_FLOOR, ROOT, batch_conversations, native_missing, open_batch_pool

ADAPTERS, MIXES = BATCH_ADAPTERS, BATCH_MIXES
STEPS = 12


@pytest.fixture(scope="module")
def pool(base_model, shared_dir):
    with open_batch_pool(base_model) as p:
        yield p


@pytest.fixture(scope="module")
def native_pool(pool):
    if not pool.native:
        from loramux import native

        native_missing(native.status().reason)
    return pool


@pytest.fixture(scope="module")
def conversations():
    return batch_conversations()


def stock_greedy(pool, prompt: list[int], mix, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of ``prompt`` under ``mix`` on the stock path, and each step's top-two gap."""
    tokens, gaps = [], []
    for _ in range(steps):
        row = pool.logits(prompt + tokens, mix)[-1]
        top2 = np.sort(row)[-2:]
        tokens.append(int(np.argmax(row)))
        gaps.append(float(top2[1] - top2[0]))
    return tokens, gaps


def test_native_batch_matches_each_request_alone_on_stock(native_pool, conversations):
    pool = native_pool
    reqs = [PoolRequest(messages=c, mix=m, max_tokens=STEPS) for c, m in zip(conversations, MIXES)]
    results = pool.generate(reqs)
    assert [r.path for r in results] == ["native"] * len(reqs)
    compared = 0
    for i, (req, res) in enumerate(zip(reqs, results)):
        assert res.mix == (MIXES[i] or {})
        prompt = pool.tokenize(pool.chat_prompt(req.messages))
        want, gaps = stock_greedy(pool, prompt, MIXES[i], len(res.tokens) + (res.finish_reason == "stop"))
        for t, got in enumerate(res.tokens):
            if got != want[t]:  # allowed only where the floor can flip the argmax; the texts part there
                assert gaps[t] <= GAP_FLOOR, f"request {i} step {t}: batch {got}, stock alone {want[t]} (gap {gaps[t]:.2f})"
                break
            compared += 1
        else:
            t = len(res.tokens)
            if res.finish_reason == "stop" and gaps[t] > GAP_FLOOR:  # stopped at an end-of-generation token
                import llama_cpp

                assert llama_cpp.llama_vocab_is_eog(pool.model.vocab, want[t]), f"request {i}: stock goes on at step {t}"
    assert compared >= 2 * len(reqs), f"only {compared} steps compared: the oracle says too little"


def test_a_mix_wider_than_max_active_runs_on_the_whole_context_in_the_same_engine(native_pool, conversations):
    pool = native_pool
    wide = {n: 0.25 for n in ADAPTERS[:4]}  # 4 adapters > max_active=3
    reqs = [
        PoolRequest(messages=conversations[0], mix=MIXES[0], max_tokens=8),
        PoolRequest(messages=conversations[1], mix=wide, max_tokens=8),
        PoolRequest(messages=conversations[2], mix=MIXES[1], max_tokens=8),
    ]
    calls = pool.lora_stats.set_calls
    got = pool.generate(reqs)
    assert [r.path for r in got] == ["native", "context", "native"]
    assert pool.lora_stats.set_calls > calls  # the wide mix was set on the context (and cleared after)
    alone = pool.create_chat_completion(conversations[1], mix=wide, temperature=0, max_tokens=8)
    assert got[1].text == alone["choices"][0]["message"]["content"]  # its group decodes alone: same numerics
    assert got[1].mix == wide and alone["path"] == "context"


def test_a_prompt_longer_than_the_context_is_refused_with_its_length(pool):
    with pytest.raises(ContextLengthError, match="n_ctx"):
        pool.create_completions(["The capital of France is"], mix=MIXES[1], max_tokens=600)  # > n_ctx=512


def test_openai_shaped_batches(pool):
    prompts = ["not ( True ) and ( True ) is", "The capital of France is"]
    outs = pool.create_completions(prompts, mixes=[{"boolean_expressions": 1.0}, None], max_tokens=6)
    assert [o["object"] for o in outs] == ["text_completion"] * 2
    assert outs[0]["mix"] == {"boolean_expressions": 1.0} and outs[1]["mix"] == {}
    assert all(o["usage"]["completion_tokens"] >= 1 and o["choices"][0]["text"] for o in outs)
    assert {o["path"] for o in outs} == {"native" if pool.native else "context"}
    chats = pool.create_chat_completions([[{"role": "user", "content": p}] for p in prompts], mix={"navigate": 1.0}, max_tokens=6)
    assert [c["choices"][0]["message"]["role"] for c in chats] == ["assistant"] * 2
    assert all(c["mix"] == {"navigate": 1.0} for c in chats)


def test_batch_errors_name_the_input(pool):
    with pytest.raises(MixError, match="nope"):
        pool.create_completions(["a"], mixes=[{"nope": 1.0}])
    with pytest.raises(LoramuxError, match="2 requests but 1 mixes"):
        pool.create_completions(["a", "b"], mixes=[None])
    with pytest.raises(LoramuxError, match="either mixes="):
        pool.create_completions(["a"], mixes=[None], mix={"navigate": 1.0})
    with pytest.raises(LoramuxError, match="exactly one of prompt= or messages="):
        PoolRequest()
    for bad in (0, 2.5, True):  # checked once, by the engine's request type, whichever door it came through
        with pytest.raises(RequestError, match="max_tokens must be a whole number >= 1") as refused:
            pool.generate([PoolRequest(prompt="a", max_tokens=bad)])
        assert refused.value.param == "max_tokens"
    with pytest.raises(LoramuxError, match="unsupported keyword.*mirostat"):
        pool.create_completions(["a"], mirostat_mode=2)


def test_an_adapter_loaded_after_a_batch_joins_the_next_one(native_pool, shared_dir):
    pool = native_pool
    pool.create_completions(["Hi"], mix={"navigate": 1.0}, max_tokens=2)
    pool.load(FIXTURES / "dyck_languages")
    out = pool.create_completions(["[ ( [ ]"], mixes=[{"dyck_languages": 1.0}], max_tokens=4)
    assert out[0]["path"] == "native" and out[0]["mix"] == {"dyck_languages": 1.0}


FALLBACK_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from loramux import AdapterPool, native
    from loramux.native import _loader
    _loader.API_VERSION = -1  # the loaded library's loramux API is not the one this package needs
    with AdapterPool(n_ctx=512) as pool:
        pool.load(sys.argv[1])
        outs = pool.create_completions(["not ( True ) and ( True ) is"] * 2,
                                       mixes=[{"boolean_expressions": 1.0}, None], max_tokens=4)
        AdapterPool(n_ctx=256).close()  # a second pool: no second warning
print(json.dumps({"available": native.available(), "paths": [o["path"] for o in outs],
                  "texts": [o["choices"][0]["text"] for o in outs],
                  "warnings": [type(w.message).__name__ for w in caught if "native" in str(w.message)]}))
"""


def test_with_a_native_library_of_another_api_everything_runs_on_stock_with_one_warning(tmp_path, shared_dir):
    """An installed library whose loramux API version is not this package's (a stale build; here
    the package's expected version is changed in the subprocess) is not used for mixes: every
    request runs on the stock per-context path of the same libllama, with one warning. (With
    setup.sh's llama-cpp-python, built without a library of its own, no libllama at all means no
    llama_cpp, so the library is always there.)"""
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(FIXTURES / "boolean_expressions")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["available"] is False
    assert got["paths"] == ["context", "context"]
    assert all(got["texts"])
    assert got["warnings"] == ["NativeUnavailableWarning"]
