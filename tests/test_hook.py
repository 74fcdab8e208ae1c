"""``loramux serve --upstream``: the router in front of a real stock llama-server (built from the pinned
llama.cpp sources by scripts/build_llama_server.sh) serving adapters that loramux converted.

Oracle: the same request sent straight to the llama-server with the ``lora`` field written by
hand (every adapter with an explicit scale, ``cache_prompt: false``).
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from hook_client import auto_routes_and_streams

from conftest import FIXTURES, ROUTER_TASKS, load_rows
from floors import HOOK_LOGPROB_TOL as LOGPROB_TOL
from llama_server import llama_server_binary, running_llama_server
from serve_proc import loramux_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, base_model, shared_dir):
    from loramux.converters import convert_peft_to_gguf

    out = tmp_path_factory.mktemp("hook-adapters")
    for name in ROUTER_TASKS:
        convert_peft_to_gguf(FIXTURES / name, base_model, out / f"{name}.gguf")
    return [out / f"{n}.gguf" for n in ROUTER_TASKS]


@pytest.fixture(scope="module")
def upstream(converted, base_model):
    llama_server_binary()  # builds once (cached under $LORAMUX_HOME)
    with running_llama_server(base_model, converted, n_parallel=2, n_ctx=2048, threads=2) as url:
        yield url


@pytest.fixture(scope="module")
def hook(upstream, small_router, base_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("hook")
    config = log_dir / "hook.toml"
    config.write_text("[mixes]\nlogic = { boolean_expressions = 0.6, navigate = 0.4 }\n")
    with loramux_server(
        "--upstream", upstream, "--base", str(base_model), "--router", str(small_router[0]), "--config", str(config), log_dir=log_dir
    ) as url:
        yield url


def direct(upstream, path, body, mix):
    ids = {a["path"].rsplit("/", 1)[-1][:-5]: a["id"] for a in httpx.get(f"{upstream}/lora-adapters").json()}
    lora = [{"id": i, "scale": mix.get(n, 0.0)} for n, i in ids.items()]
    return httpx.post(f"{upstream}{path}", json={**body, "lora": lora, "cache_prompt": False}, timeout=300).json()


def test_a_named_adapter_is_forwarded_with_every_scale_explicit(hook, upstream):
    body = {"prompt": "not ( True ) and ( True ) is", "max_tokens": 8, "temperature": 0}
    via = httpx.post(f"{hook}/v1/completions", json={**body, "model": "boolean_expressions"}, timeout=300)
    assert via.status_code == 200, via.text
    assert json.loads(via.headers["x-loramux-mix"]) == {"boolean_expressions": 1.0}
    assert via.json()["mix"] == {"boolean_expressions": 1.0}
    want = direct(upstream, "/v1/completions", body, {"boolean_expressions": 1.0})
    assert via.json()["choices"][0]["text"] == want["choices"][0]["text"]
    base = httpx.post(f"{hook}/v1/completions", json=body, timeout=300).json()  # base: all scales 0, never "lora": []
    assert base["choices"][0]["text"] == direct(upstream, "/v1/completions", body, {})["choices"][0]["text"]
    assert base["mix"] == {}


def test_a_cached_prefix_is_never_reused_across_mixes(hook, upstream):
    row = load_rows("dev", {"navigate"}, limit_per_task=1)[0]
    prompt = f"<|im_start|>user\n{row['input']}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2's chat template
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1}
    mix_b = {"navigate": 1.0}
    fresh = direct(upstream, "/v1/completions", body, mix_b)
    httpx.post(f"{hook}/v1/completions", json={**body, "mix": {"boolean_expressions": 1.0}}, timeout=300)  # same prompt, other mix
    outs: dict[str, dict] = {}

    def send(label, mix):
        outs[label] = httpx.post(f"{hook}/v1/completions", json={**body, "mix": mix}, timeout=300).json()

    threads = [threading.Thread(target=send, args=("b", mix_b)), threading.Thread(target=send, args=("a", {"boolean_expressions": 1.0}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)

    def first_lp(out):
        return (
            out["choices"][0]["logprobs"]["content"][0]["logprob"]
            if "content" in out["choices"][0]["logprobs"]
            else out["choices"][0]["logprobs"]["token_logprobs"][0]
        )

    assert abs(first_lp(outs["b"]) - first_lp(fresh)) < LOGPROB_TOL
    want_a = direct(upstream, "/v1/completions", body, {"boolean_expressions": 1.0})
    assert abs(first_lp(outs["a"]) - first_lp(want_a)) < LOGPROB_TOL
    assert abs(first_lp(want_a) - first_lp(fresh)) > 10 * LOGPROB_TOL, "the two mixes should differ here"


def test_streams_pass_through_and_auto_routes(hook):
    _, msgs = auto_routes_and_streams(hook)
    client = openai.OpenAI(base_url=f"{hook}/v1", api_key="unused", max_retries=0)
    named = client.chat.completions.create(model="logic", messages=msgs, temperature=0, max_tokens=2)
    assert named.model_extra["mix"] == {"boolean_expressions": 0.6, "navigate": 0.4}


def test_the_hook_refuses_adapters_the_upstream_does_not_serve(hook):
    r = httpx.post(f"{hook}/v1/completions", json={"prompt": "hi", "mix": {"snarks": 1.0}})
    assert r.status_code == 400 and "does not serve: snarks" in r.json()["error"]["message"]
    r = httpx.post(f"{hook}/v1/completions", json={"prompt": "hi", "model": "snarks", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.headers["x-loramux-unknown-model"] == "snarks"  # answered as no model, said so


def test_llama_server_routes_through_the_hook(hook, upstream):
    """llama-server's own routes in front of it: /completion with the mix selected (the same answer
    as the upstream given that mix's lora field), the routes that involve no mix passed through."""
    body = {"prompt": "not ( True ) and ( True ) is", "n_predict": 8, "temperature": 0}
    via = httpx.post(f"{hook}/completion", json={**body, "model": "boolean_expressions"}, timeout=300)
    assert via.status_code == 200 and via.json()["mix"] == {"boolean_expressions": 1.0}, via.text
    assert via.json()["content"] == direct(upstream, "/completion", body, {"boolean_expressions": 1.0})["content"]
    banned = {**body, "logit_bias": [[" True", False], [28, -100]]}  # llama-server's pairs, a text banned: sent as they are
    via = httpx.post(f"{hook}/completion", json={**banned, "model": "boolean_expressions"}, timeout=300)
    assert (
        via.status_code == 200 and via.json()["content"] == direct(upstream, "/completion", banned, {"boolean_expressions": 1.0})["content"]
    )
    tokens = httpx.post(f"{hook}/tokenize", json={"content": "Hello world"}, timeout=60).json()
    assert tokens == httpx.post(f"{upstream}/tokenize", json={"content": "Hello world"}, timeout=60).json()
    assert httpx.post(f"{hook}/detokenize", json=tokens, timeout=60).json()["content"] == "Hello world"
    assert httpx.get(f"{hook}/props", timeout=60).json()["total_slots"] == 2
