"""``loramux serve`` for real: a server process on loopback, driven by the official ``openai`` client and by
plain HTTP shaped as llama-server's clients send it.

Oracle for concurrent streams: each completion asks for ``logprobs=2``, so every step reports its
top-two log-probabilities; a concurrent answer must equal the same request sent alone, token by
token, except where the alone answer's top-two gap at that step is at or below the batch floor
(GAP_FLOOR, as in tests/test_engine.py), where the texts may part.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import pytest

from conftest import FIXTURES, GAP_FLOOR, ROUTER_TASKS, load_rows
from serve_proc import loramux_server

openai = pytest.importorskip("openai")


EXTRA = ["hyperbaton", "snarks"]  # beside the router's three
LATE = "dyck_languages"  # loaded through the API during the tests


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, small_pool_dir):
    folder = tmp_path_factory.mktemp("serve-adapters")
    for name in ROUTER_TASKS:
        shutil.copytree(small_pool_dir / name, folder / name)
    for name in EXTRA:
        shutil.copytree(FIXTURES / name, folder / name)
    shutil.copytree(FIXTURES / LATE, folder / "later" / LATE)  # not loaded at start (one level deeper)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_dir, small_router, base_model):
    config = tmp_path_factory.mktemp("serve-config") / "serve.toml"
    config.write_text("n_seq_max = 4\nn_ctx = 512\n[mixes]\nlogic = { boolean_expressions = 0.7, navigate = 0.3 }\n")
    with loramux_server(
        "--config",
        str(config),
        "--base",
        str(base_model),
        "--adapters",
        str(adapter_dir),
        "--router",
        str(small_router[0]),
        "--threads",
        "2",
        log_dir=config.parent,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def chat(text):
    return [{"role": "user", "content": text}]


def test_openai_client_chat_streamed_and_not_under_a_named_adapter(client):
    msgs = chat("not ( True ) and ( True ) is")
    whole = client.chat.completions.create(model="boolean_expressions", messages=msgs, temperature=0, max_tokens=16)
    extra = whole.model_extra
    assert extra["mix"] == {"boolean_expressions": 1.0} and extra["mix_source"] == "adapter"
    stream = client.chat.completions.create(
        model="boolean_expressions", messages=msgs, temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    parts, usage, roles = [], None, []
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            roles.append(chunk.choices[0].delta.role)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == whole.choices[0].message.content and whole.choices[0].message.content
    assert roles[0] == "assistant" and usage.completion_tokens == whole.usage.completion_tokens


def test_structured_outputs_through_the_openai_client_streamed_and_not(client, server):
    """The official client's ``parse`` with a pydantic model, a raw json_schema streamed and not,
    llama-server's ``json_schema`` field, and a grammar that does not parse (a 400 naming it)."""
    from typing import Literal

    import pydantic

    class Verdict(pydantic.BaseModel):
        answer: Literal["True", "False"]

    parsed = client.chat.completions.parse(
        model="boolean_expressions", messages=chat("not ( True ) and ( True ) is"), response_format=Verdict, temperature=0, max_tokens=32
    )
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    colors = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}
    raw = {"type": "json_schema", "json_schema": {"name": "colors", "schema": colors}}
    kw = dict(model="navigate", messages=chat("Name two colors."), response_format=raw, temperature=0, max_tokens=32)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices)
    assert streamed == whole and 2 <= len(json.loads(whole)) <= 3 and set(json.loads(whole)) <= {"red", "green", "blue"}
    r = httpx.post(
        f"{server}/v1/completions", json={"prompt": "Colors:", "json_schema": colors, "max_tokens": 32, "temperature": 0}, timeout=120
    )
    assert r.status_code == 200 and set(json.loads(r.json()["choices"][0]["text"])) <= {"red", "green", "blue"}
    bad = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "grammar": "root ::= (", "max_tokens": 2}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "grammar", bad.text


def test_openai_client_completions_with_a_body_mix_and_a_named_mix(client):
    out = client.completions.create(
        model="loramux",
        prompt="The capital of France is",
        max_tokens=6,
        temperature=0,
        extra_body={"mix": {"navigate": 0.5, "snarks": 0.5}},
    )
    assert out.model_extra["mix"] == {"navigate": 0.5, "snarks": 0.5} and out.choices[0].text
    named = client.completions.create(model="logic", prompt="True and False is", max_tokens=4, temperature=0)
    assert named.model_extra["mix"] == {"boolean_expressions": 0.7, "navigate": 0.3}
    assert named.model_extra["mix_source"] == "named"


def test_model_auto_routes_and_reports_the_scores(client):
    row = load_rows("dev", {"sports_understanding"}, limit_per_task=1)[0]
    out = client.chat.completions.create(model="auto", messages=chat(row["input"]), temperature=0, max_tokens=4)
    routing = out.model_extra["routing"]
    assert routing["top1"] == "sports_understanding" and set(routing["scores"]) >= set(ROUTER_TASKS)
    assert out.model_extra["mix"] == routing["mix"] and out.model_extra["mix_source"] == "auto"


def test_a_router_that_reads_no_file_is_named_by_model_or_mix(server, client):
    """``model: "pooled:arrow"`` routes the prompt (one pass, no samples) and reports the routing as ``auto``
    does; ``mix: "pooled:arrow"`` means the same; /v1/models lists it; a bad spec is a 400 naming the field."""
    row = load_rows("dev", {"sports_understanding"}, limit_per_task=1)[0]
    out = client.chat.completions.create(model="pooled:arrow", messages=chat(row["input"]), temperature=0, max_tokens=4)
    routing = out.model_extra["routing"]
    assert out.model_extra["mix_source"] == "router" and out.model_extra["mix"] == routing["mix"]
    assert 1 <= len(routing["mix"]) <= 3 and set(routing["mix"]) <= set(ROUTER_TASKS + EXTRA)
    body = {"messages": chat(row["input"]), "max_tokens": 4, "temperature": 0}
    via_mix = httpx.post(f"{server}/v1/chat/completions", json={**body, "mix": "pooled:arrow"}, timeout=120).json()
    assert via_mix["mix"] == routing["mix"] and via_mix["choices"][0]["message"]["content"] == out.choices[0].message.content
    assert "pooled:arrow" in [m.id for m in client.models.list().data]
    bad = httpx.post(f"{server}/v1/chat/completions", json={**body, "mix": "pooled:arrow:k=0"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "mix" and "pooled:arrow" in bad.json()["error"]["message"]


def test_a_llama_server_client_uses_the_lora_field_unchanged(server):
    listing = httpx.get(f"{server}/lora-adapters").json()
    assert all(set(a) == {"id", "path", "scale"} for a in listing)
    ids = {os.path.basename(a["path"]).split("-")[0]: a["id"] for a in listing}
    body = {
        "prompt": "not ( True ) and ( True ) is",
        "max_tokens": 6,
        "temperature": 0,
        "lora": [{"id": ids["boolean_expressions"], "scale": 0.5}, {"id": ids["navigate"], "scale": 0.5}],
    }
    via_lora = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()
    via_mix = httpx.post(
        f"{server}/v1/completions",
        json={**{k: v for k, v in body.items() if k != "lora"}, "mix": {"boolean_expressions": 0.5, "navigate": 0.5}},
        timeout=120,
    ).json()
    assert via_lora["mix"] == {"boolean_expressions": 0.5, "navigate": 0.5} and via_lora["mix_source"] == "lora"
    assert via_lora["choices"][0]["text"] == via_mix["choices"][0]["text"]
    bad = httpx.post(f"{server}/v1/completions", json={**body, "lora": [{"id": 99, "scale": 1}]})
    assert bad.status_code == 400 and "id 99" in bad.json()["error"]["message"]


def _alone_and_gaps(server, body):
    out = httpx.post(f"{server}/v1/completions", json={**body, "logprobs": 2}, timeout=300).json()
    lp = out["choices"][0]["logprobs"]
    gaps = [sorted(t.values())[-1] - sorted(t.values())[-2] if t and len(t) > 1 else float("inf") for t in lp["top_logprobs"]]
    return lp["tokens"], gaps


def test_concurrent_streamed_clients_get_what_they_get_alone(server, client):
    rows = load_rows("dev", set(ROUTER_TASKS) | set(EXTRA), limit_per_task=1)
    mixes = [
        {"boolean_expressions": 1.0},
        {"navigate": 0.6, "hyperbaton": 0.4},
        {},
        {"snarks": 1.0, "navigate": -0.3},
        {"sports_understanding": 1.0},
        {"hyperbaton": 1.0},
    ]
    bodies = [{"prompt": r["input"], "max_tokens": 12, "temperature": 0, "mix": m, "logit_bias": {"2": -100}} for r, m in zip(rows, mixes)]
    alone = [_alone_and_gaps(server, b) for b in bodies]
    metrics0 = _metrics(server)
    got: dict[int, list[str]] = {}

    def one(i):
        stream = client.completions.create(
            model="loramux",
            stream=True,
            logprobs=0,
            **{k: v for k, v in bodies[i].items() if k in ("prompt", "max_tokens", "temperature", "logit_bias")},
            extra_body={"mix": bodies[i]["mix"]},
        )
        got[i] = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    metrics1 = _metrics(server)
    steps = metrics1["loramux_decode_steps_total"] - metrics0["loramux_decode_steps_total"]
    seqs = metrics1["loramux_step_sequences_total"] - metrics0["loramux_step_sequences_total"]
    assert seqs / steps > 1.5, f"{seqs / steps:.2f} sequences per decode: the clients were not batched"
    compared = 0
    for i, (want, gaps) in enumerate(alone):
        for t, (a, b) in enumerate(zip(got[i], want)):
            if a != b:
                assert gaps[t] <= GAP_FLOOR, f"client {i} step {t}: {a!r} concurrent, {b!r} alone (gap {gaps[t]:.2f})"
                break
            compared += 1
    assert compared >= 2 * len(bodies)


def _metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith("loramux_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_a_client_that_goes_away_cancels_its_request(server):
    before = _metrics(server)["loramux_requests_cancelled_total"]
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True, "logit_bias": {"2": -100}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data:"))
    deadline = time.time() + 30
    while time.time() < deadline:
        m = _metrics(server)
        if m["loramux_requests_cancelled_total"] > before and m["loramux_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert m["loramux_requests_cancelled_total"] == before + 1 and m["loramux_requests_running"] == 0


def test_a_non_streamed_request_is_cancelled_when_its_client_goes_away(server):
    """The client of a long non-streamed completion gives up after 1 s: the request is cancelled
    within a few steps instead of generating its 400 tokens for nobody."""
    before = _metrics(server)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "logit_bias": {"2": -100}}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    gone = time.time()
    deadline = gone + 30
    while time.time() < deadline:
        m = _metrics(server)
        if m["loramux_requests_cancelled_total"] > before["loramux_requests_cancelled_total"] and m["loramux_requests_running"] == 0:
            break
        time.sleep(0.05)
    assert m["loramux_requests_cancelled_total"] == before["loramux_requests_cancelled_total"] + 1, "the request ran on"
    assert time.time() - gone < 5, f"cancelled only after {time.time() - gone:.1f} s"


@pytest.fixture(scope="module")
def logo_server(tmp_path_factory, adapter_dir, base_model):
    log_dir = tmp_path_factory.mktemp("serve-logo")
    args = ["--base", str(base_model), "--adapters", str(adapter_dir), "--router", "logo", "--threads", "2", "--n-ctx", "2048"]
    with loramux_server(*args, log_dir=log_dir) as url:
        yield url


def test_a_router_runs_off_the_event_loop(logo_server):
    """LoGo runs a prefill to route: while it does, the server still answers (/health). On the event
    loop it held every other request for the whole routing pass (measured, with a prompt 3x this: /health waited 10.96 s of an 11.17 s request)."""
    prompt = " ".join(["Sort the following words alphabetically: List: oven costume counterpart"] * 20)
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0}
    httpx.post(f"{logo_server}/v1/chat/completions", json=body, timeout=120).raise_for_status()  # warm
    done: dict[str, float] = {}

    def routed() -> None:
        t0 = time.perf_counter()
        httpx.post(f"{logo_server}/v1/chat/completions", json=body, timeout=120).raise_for_status()
        done["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=routed)
    thread.start()
    worst = 0.0
    with httpx.Client() as c:
        while thread.is_alive():
            t0 = time.perf_counter()
            c.get(f"{logo_server}/health", timeout=120)
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.01)
    thread.join()
    assert worst < 0.25 * done["s"], f"/health waited {worst:.2f} s during a {done['s']:.2f} s routed request"


def test_adapters_load_and_unload_during_traffic(server):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "mix": {"navigate": 1.0},
        "logit_bias": {"2": -100},
    }
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(ln for ln in lines if ln.startswith("data:"))
        loaded = httpx.post(f"{server}/v1/adapters", json={"path": f"later/{LATE}"}, timeout=300)
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["id"] == LATE and loaded.json()["from_peft"]
        rest = [ln for ln in lines if ln.startswith("data:")]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
    out = httpx.post(f"{server}/v1/completions", json={"model": LATE, "prompt": "[ ( [", "max_tokens": 3}, timeout=120)
    assert out.status_code == 200 and out.json()["mix"] == {LATE: 1.0}
    assert httpx.delete(f"{server}/v1/adapters/{LATE}", timeout=120).json()["deleted"] is True
    gone = httpx.post(f"{server}/v1/completions", json={"model": LATE, "prompt": "x", "max_tokens": 2}, timeout=120)  # gone: no model
    assert gone.status_code == 200 and gone.headers["x-loramux-unknown-model"] == LATE
    assert gone.json()["mix"] == {} and gone.json()["mix_source"] == "unknown_model"


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "link-out"])
def test_the_adapter_endpoint_reads_nothing_outside_its_directories(server, adapter_dir, path):
    if path == "link-out" and not (adapter_dir / "link-out").exists():
        (adapter_dir / "link-out").symlink_to(FIXTURES / "snarks", target_is_directory=True)
    r = httpx.post(f"{server}/v1/adapters", json={"path": path})
    assert r.status_code in (403, 404) and "adapter directories" in r.json()["error"]["message"]
    if path != "../outside":
        assert r.status_code == 403


def test_errors_in_openai_shape(server, client):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "mix": {"nope": 1.0}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_mix" and "'nope'" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", content='{"prompt": "hi", "mix": {"navigate": Infinity}}')
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", json={"prompt": "hi", "mix": {"navigate": 9}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_mix"
    long = "word " * 600
    r = httpx.post(f"{server}/v1/completions", json={"prompt": long, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": chat("hi"), "tools": [{"type": "function"}]})
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(tmp_path, adapter_dir, base_model):
    with loramux_server(
        "--base",
        str(base_model),
        "--adapters",
        str(adapter_dir / "navigate"),
        "--n-seq-max",
        "1",
        "--max-queue",
        "1",
        "--n-ctx",
        "1024",
        "--threads",
        "1",
        log_dir=tmp_path,
    ) as url:
        slow = {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0, "stream": True, "logit_bias": {"2": -100}}
        with httpx.stream("POST", f"{url}/v1/completions", json=slow, timeout=120) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the stream (the server cancels)
            next(ln for ln in lines if ln.startswith("data:"))
            with httpx.stream("POST", f"{url}/v1/completions", json=slow, timeout=120) as waiting:
                full = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                assert full.status_code == 429 and full.headers["retry-after"] == "1"
                assert full.json()["error"]["code"] == "queue_full"
                assert waiting.status_code == 200


def test_api_key_and_loopback(tmp_path, adapter_dir, base_model):
    with loramux_server(
        "--base",
        str(base_model),
        "--adapters",
        str(adapter_dir / "navigate"),
        "--api-key",
        "s3cret",
        "--n-ctx",
        "256",
        "--n-seq-max",
        "1",
        log_dir=tmp_path,
    ) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret").models.list()
        assert [m.id for m in ok.data][:2] == ["loramux", "navigate"]
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "loramux", "serve", "--adapters", str(adapter_dir), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "loopback only" in done.stderr


def _http_label_values(server) -> set[str]:
    return {
        line.split("{", 1)[1].split("}", 1)[0]
        for line in httpx.get(f"{server}/metrics").text.splitlines()
        if line.startswith("loramux_http_responses_total{")
    }


def test_requests_to_made_up_paths_add_no_metric_labels(server):
    """Labels come from the route table: 1,000 requests to random paths add at most the one
    ``unmatched`` label per status (labelled by the raw path, they added 1,000 values)."""
    import random

    httpx.get(f"{server}/health")
    _http_label_values(server)  # /metrics counts itself after answering
    before = _http_label_values(server)
    rng = random.Random(3)
    with httpx.Client() as c:
        for _ in range(1000):
            assert c.get(f"{server}/{rng.randrange(10**9)}/x").status_code == 404
        c.get(f"{server}/health")
    added = _http_label_values(server) - before
    assert added <= {'path="unmatched",status="404"'}, f"{len(added)} label values added: {sorted(added)[:3]}"
    assert any('path="/health"' in v for v in _http_label_values(server))
