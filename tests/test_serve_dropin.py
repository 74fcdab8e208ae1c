"""``loramux serve`` as a drop-in for llama-server and OpenAI clients: llama-server's routes and
fields, ``n`` choices, chat log-probabilities, assistant prefill, CORS, several addresses, unknown
model names, errors. Real server processes on loopback, the real model, real clients.

Oracles: ``n`` choices against the same request sent alone with each choice's seed (a wrong seed
is caught); chat ``top_logprobs`` against ``/v1/completions`` logprobs of the same prompt (another
mix is caught); a continued assistant message against a completion of the template's text cut
after it (a new turn is caught); llama-server's streamed ``/completion`` against the whole one.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from serve_proc import loramux_server

openai = pytest.importorskip("openai")

ORIGIN = "https://app.example"
MIX = {"boolean_expressions": 0.6, "navigate": 0.4}


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HOSTS = "127.0.0.1,::1" if _ipv6_loopback() else "127.0.0.1,localhost"


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_pool_dir, base_model):
    log = tmp_path_factory.mktemp("dropin")
    args = ["--base", str(base_model), "--adapters", str(small_pool_dir), "--n-seq-max", "4", "--n-ctx", "512"]
    with loramux_server(*args, "--threads", "2", "--host", HOSTS, "--cors", ORIGIN, log_dir=log) as url:
        yield url


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory, base_model):
    """No adapters, vLLM's answer to unknown model names, no CORS."""
    log = tmp_path_factory.mktemp("dropin-bare")
    with loramux_server("--base", str(base_model), "--unknown-model", "error", "--n-ctx", "256", "--n-predict", "3", log_dir=log) as url:
        yield url


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120, **kw)


def sse(url: str, path: str, body: dict) -> list:
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]


def test_n_choices_each_equal_the_request_alone_with_its_seed(server):
    body = {"prompt": "The three best fruits are", "max_tokens": 12, "temperature": 1.0, "seed": 11, "mix": MIX}
    together = post(server, "/v1/completions", body | {"n": 3}).json()
    texts = [c["text"] for c in sorted(together["choices"], key=lambda c: c["index"])]
    alone = [post(server, "/v1/completions", body | {"seed": 11 + i}).json() for i in range(3)]
    assert texts == [a["choices"][0]["text"] for a in alone]
    assert len(set(texts)) > 1  # the choices really are different draws
    wrong = post(server, "/v1/completions", body | {"seed": 11 + 7}).json()["choices"][0]["text"]
    assert wrong not in texts  # negative control: the oracle tells seeds apart
    assert together["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    assert together["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]


def test_n_choices_stream_with_their_index_and_one_usage_chunk(server):
    body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5, "n": 2, "temperature": 0.9, "seed": 3}
    events = sse(server, "/v1/chat/completions", body | {"stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    firsts = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert sorted(c["choices"][0]["index"] for c in firsts) == [0, 1]
    assert all(c["choices"][0]["delta"]["content"] is None for c in firsts)  # OpenAI's first delta
    usage = [c for c in chunks if not c["choices"]]
    assert len(usage) == 1 and chunks[-1] is usage[0] and usage[0]["usage"]["completion_tokens"] == 10
    text = {
        i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
        for i in (0, 1)
    }
    whole = post(server, "/v1/chat/completions", body).json()
    assert [text[0], text[1]] == [c["message"]["content"] for c in whole["choices"]]


def test_chat_top_logprobs_agree_with_completion_logprobs(server):
    messages = [{"role": "user", "content": "not ( True ) and True is"}]
    chat = post(
        server,
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3, "mix": MIX},
    ).json()
    content = chat["choices"][0]["logprobs"]["content"]
    prompt = post(server, "/apply-template", {"messages": messages}).json()["prompt"]
    ids = post(server, "/tokenize", {"content": prompt}).json()["tokens"]
    comp = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 3, "mix": MIX}).json()
    lp = comp["choices"][0]["logprobs"]
    assert [c["token"] for c in content] == lp["tokens"]
    assert [c["logprob"] for c in content] == pytest.approx(lp["token_logprobs"], abs=1e-5)
    for c, top in zip(content, lp["top_logprobs"]):
        assert {t["token"]: t["logprob"] for t in c["top_logprobs"]} == pytest.approx(top, abs=1e-5)
    other = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 3, "model": "navigate"}).json()
    assert other["choices"][0]["logprobs"]["token_logprobs"] != pytest.approx(lp["token_logprobs"], abs=1e-5)  # negative control


def test_an_assistant_prefill_is_continued(server):
    messages = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "The best fruit is the"}]
    chat = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}).json()
    prompt = post(server, "/apply-template", {"messages": messages}).json()["prompt"]
    assert prompt.endswith("The best fruit is the")
    ids = post(server, "/tokenize", {"content": prompt}).json()["tokens"]
    comp = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == comp["choices"][0]["text"]
    new_turn = post(
        server, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0, "continue_final_message": False}
    )
    assert new_turn.json()["choices"][0]["message"]["content"] != comp["choices"][0]["text"]  # negative control
    bad = post(server, "/v1/chat/completions", {"messages": messages[:1], "continue_final_message": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"


def test_llama_server_completion_whole_and_streamed(server):
    body = {"prompt": "Once upon a time", "n_predict": 7, "temperature": 0, "n_probs": 2, "cache_prompt": True}
    whole = post(server, "/completion", body).json()
    assert whole["stop"] is True and whole["stop_type"] == "limit" and whole["tokens_predicted"] == 7
    assert whole["tokens_evaluated"] > 0 and len(whole["completion_probabilities"]) == 7
    assert all(len(p["top_logprobs"]) == 2 for p in whole["completion_probabilities"])
    events = [json.loads(e) for e in sse(server, "/completions", body | {"stream": True})]
    assert events[-1]["stop"] is True and all(not e["stop"] for e in events[:-1])
    assert "".join(e["content"] for e in events) == whole["content"]
    stopped = post(server, "/completion", {"prompt": "1, 2, 3,", "n_predict": 20, "temperature": 0, "stop": [","]}).json()
    assert stopped["stop_type"] == "word" and stopped["stopping_word"] == ","


def test_llama_server_fields_are_honoured_or_refused(server):
    three = post(server, "/v1/completions", {"prompt": "Once upon a time", "n_predict": 3, "temperature": 0}).json()
    assert three["usage"]["completion_tokens"] == 3
    for field, value in (("mirostat", 2), ("dry_multiplier", 0.5), ("samplers", ["top_k"]), ("post_sampling_probs", True)):
        r = post(server, "/v1/completions", {"prompt": "x", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "mirostat": 0, "id_slot": 1}).status_code == 200
    clash = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n_predict": 3})
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "n_predict"


def test_tokenize_detokenize_props_and_lora_scales(server):
    toks = post(server, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(t["piece"] for t in toks) == "Hello world"
    assert post(server, "/detokenize", {"tokens": [t["id"] for t in toks]}).json()["content"] == "Hello world"
    props = httpx.get(server + "/props").json()
    assert props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == 512
    assert props["model_path"].endswith(".gguf") and "im_start" in props["chat_template"]
    assert post(server, "/lora-adapters", [{"id": 0, "scale": 0.5}]).json() == {"success": True}
    assert post(server, "/lora-adapters", []).json() == {"success": True}
    models = httpx.get(server + "/models").json()
    assert models == httpx.get(server + "/v1/models").json() | {"data": models["data"]}


def test_unknown_model_answers_as_no_model_with_a_header(server):
    r = post(server, "/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-loramux-unknown-model"] == "gpt-4o" and r.json()["mix"] == {}
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.choices[0].finish_reason == "length"


def test_cors_and_several_addresses(server):
    pre = httpx.options(server + "/v1/chat/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    other = httpx.options(server + "/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    got = httpx.get(server + "/v1/models", headers={"Origin": ORIGIN})
    assert got.headers["access-control-allow-origin"] == ORIGIN
    port = server.rsplit(":", 1)[1]
    second = "[::1]" if "::1" in HOSTS else "localhost"
    assert httpx.get(f"http://{second}:{port}/health").json() == {"status": "ok"}


def test_context_overflow_has_llama_server_and_openai_fields(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "exceed_context_size_error" and err["code"] == "context_length_exceeded"
    assert err["n_prompt_tokens"] > 512 and err["n_ctx"] == 512


def test_a_server_without_adapters_and_with_vllm_model_names(bare_server):
    models = httpx.get(bare_server + "/v1/models").json()["data"]
    assert [m["id"] for m in models][0] == "loramux"
    r = post(bare_server, "/v1/completions", {"model": "gpt-4o", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    out = post(bare_server, "/completion", {"prompt": "Once upon a time", "temperature": 0}).json()  # --n-predict 3
    assert out["tokens_predicted"] == 3
    pre = httpx.options(bare_server + "/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in pre.headers  # CORS is off unless --cors


SCHEMAS = [
    {"type": "object", "properties": {"answer": {"enum": ["True", "False"]}}, "required": ["answer"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}}, "required": ["name", "ok"]},
    {"type": "object", "properties": {"count": {"type": "integer"}, "unit": {"enum": ["m", "kg"]}}, "required": ["count", "unit"]},
    {"enum": ["yes", "no", "maybe"]},
]
MIXES = [{"boolean_expressions": 1.0}, {"navigate": 0.7, "sports_understanding": 0.3}, {}, {"sports_understanding": 1.0}, MIX]
PROMPTS = ["not ( True ) and True is", "Name some colors.", "Describe a sailor.", "How heavy is a cat?", "Is it raining?"]


def _structured_body(i: int) -> dict:
    schema = SCHEMAS[i % len(SCHEMAS)]
    return {
        "messages": [{"role": "user", "content": f"{PROMPTS[(i // 5) % len(PROMPTS)]} (case {i})"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i % 5}", "schema": schema, "strict": True}},
        "mix": MIXES[(i // 2) % len(MIXES)],
        "max_tokens": 40,
        "temperature": 0,
    }


def _parting_allowed(alone: dict, step: int) -> bool:
    """The batch floor may part two greedy answers at ``step``: the alone answer's top-two raw gap is
    at or below it, or the grammar masked the model's own first choice there (raw gaps say nothing)."""
    from conftest import GAP_FLOOR

    content = alone["choices"][0]["logprobs"]["content"]
    if step >= len(content):
        return False
    top = sorted((t["logprob"] for t in content[step]["top_logprobs"]), reverse=True)
    masked = content[step]["logprob"] < top[0]
    return masked or len(top) < 2 or top[0] - top[1] <= GAP_FLOOR


def _same_or_parted_at_a_tie(got: str, alone: dict, piece_tokens: list[str]) -> bool:
    want = alone["choices"][0]["message"]["content"]
    if got == want:
        return True
    prefix, step = "", 0
    for step, tok in enumerate(piece_tokens):  # the step where the answers part
        if not got.startswith(prefix + tok):
            break
        prefix += tok
    return _parting_allowed(alone, step)


def test_fifty_concurrent_structured_requests_validate_and_equal_each_alone(server):
    """50 requests with different schemas and mixes through the official client at once: each answer
    validates against its schema and equals the same request alone (parting only where the batch
    floor allows); the negative control: the same oracle catches answers run under another mix."""
    import concurrent.futures

    jsonschema = pytest.importorskip("jsonschema")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=600)
    bodies = [_structured_body(i) for i in range(50)]

    def send(body: dict) -> str:
        extra = {"mix": body["mix"]}
        kw = {k: body[k] for k in ("messages", "response_format", "max_tokens", "temperature")}
        return client.chat.completions.create(model="loramux", extra_body=extra, **kw).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(50) as ex:
        together = list(ex.map(send, bodies))
    for body, text in zip(bodies, together):
        jsonschema.validate(json.loads(text), body["response_format"]["json_schema"]["schema"])
    alone = [post(server, "/v1/chat/completions", b | {"logprobs": True, "top_logprobs": 2}).json() for b in bodies]
    pieces = [[t["token"] for t in a["choices"][0]["logprobs"]["content"]] for a in alone]
    assert all(_same_or_parted_at_a_tie(t, a, p) for t, a, p in zip(together, alone, pieces))
    assert sum(t == a["choices"][0]["message"]["content"] for t, a in zip(together, alone)) >= 45  # 90% exactly equal
    # negative control: under another mix the same requests miss the 90% bar of exact equality
    picked = [i for i in range(50) if (i // 2) % len(MIXES) in (0, 2, 3)][:10]
    other = [post(server, "/v1/chat/completions", bodies[i] | {"mix": {"navigate": 1.0}}).json() for i in picked]
    same = sum(o["choices"][0]["message"]["content"] == alone[i]["choices"][0]["message"]["content"] for o, i in zip(other, picked))
    assert same < 9, f"{same} of 10 answers under another mix equal the alone ones: the oracle cannot tell mixes apart"


def test_how_messages_end_the_prompt(server):
    """add_generation_prompt, continue_final_message, two assistant messages, text parts (llama-server's join)."""
    user = {"role": "user", "content": "Hi"}
    said = {"role": "assistant", "content": "Hello"}
    opened = post(server, "/apply-template", {"messages": [user]}).json()["prompt"]
    closed = post(server, "/apply-template", {"messages": [user], "add_generation_prompt": False}).json()["prompt"]
    assert opened.startswith(closed) and opened != closed and opened.endswith("assistant\n")
    both = post(server, "/v1/chat/completions", {"messages": [user, said], "add_generation_prompt": True, "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    twice = post(server, "/v1/chat/completions", {"messages": [user, said, said]})
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "messages"
    parts = {"role": "user", "content": [{"type": "text", "text": "Wh"}, {"type": "text", "text": "ill"}]}
    assert "Wh\n\nill" in post(server, "/apply-template", {"messages": [parts]}).json()["prompt"]
    count = post(server, "/chat/completions/input_tokens", {"messages": [user]}).json()["input_tokens"]
    assert count == len(post(server, "/tokenize", {"content": opened}).json()["tokens"])
