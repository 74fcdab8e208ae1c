"""loramux's patched llama-server (``loramux llama-server build``), as real processes on loopback.

The binary links the installed patched libllama (native/server/CMakeLists.txt) and is built once
per source tree (cached under $LORAMUX_HOME/llama-server/loramux-*; a new install only relinks).

Oracles:
- **Concurrent = alone.** Requests with different ``lora`` scales sent together are compared
  token by token with the same requests sent alone (one at a time, ``cache_prompt: false``):
  greedy tokens may part only at a step whose top-two logprob gap (of the request alone) is at
  or below the batch floor ``GAP_FLOOR`` (the engine tests' rule). Negative control: the same
  comparison between two different mixes alone fails.
- **Cache keyed by mix.** ``timings.cache_n`` (tokens reused from a cached prefix) must be 0 when
  the prefix was computed under another mix and > 0 under the same mix. Negative control: stock
  llama-server (tests/llama_server.py) reuses the prefix across mixes in the same sequence
  (ggml-org/llama.cpp #26207), which this test would catch.
- **Stock behaviour without adapters**: the patched server without ``--lora`` against stock
  llama-server without ``--lora``: the same greedy tokens, logprobs within POOL_STOCK_LOGIT_TOL.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from hook_client import auto_routes_and_streams

from conftest import BATCH_ADAPTERS, GAP_FLOOR, load_rows
from floors import HOOK_LOGPROB_TOL, POOL_STOCK_LOGIT_TOL
from llama_server import llama_server_binary, running_llama_server
from serve_proc import loramux_server, loramux_server_process

STEPS = 16
MIXES = [  # ids index BATCH_ADAPTERS
    {0: 1.0},
    {1: 0.6, 2: 0.4},
    {},
    {3: 1.0, 1: -0.3, 4: 0.5},
    {2: 1.0},
    {4: 1.0},
]


@pytest.fixture(scope="module")
def binary():
    from loramux.native.server_build import build_llama_server

    return build_llama_server()


@pytest.fixture(scope="module")
def adapters(converted_dir):
    return [converted_dir / f"{n}.gguf" for n in BATCH_ADAPTERS]


@pytest.fixture(scope="module")
def patched(binary, base_model, adapters):
    with running_llama_server(
        base_model, adapters, n_parallel=4, n_ctx=4096, threads=2, binary=binary, extra_args=["--metrics", "--lora-max-active", "3"]
    ) as url:
        yield url


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2's template


@pytest.fixture(scope="module")
def prompts():
    rows = load_rows("dev", set(BATCH_ADAPTERS), limit_per_task=2)
    return [chat_prompt(r["input"]) for r in rows[: len(MIXES)]]


def lora(mix: dict[int, float], n: int = len(BATCH_ADAPTERS)) -> list[dict]:
    return [{"id": i, "scale": mix.get(i, 0.0)} for i in range(n)]


def complete(
    url: str,
    prompt: str,
    mix: dict[int, float] | None,
    *,
    steps: int = STEPS,
    cache: bool = False,
    n_adapters: int = len(BATCH_ADAPTERS),
    **extra,
) -> dict:
    """``/completion``, greedy, ``steps`` tokens (end-of-generation ignored), top-2 logprobs;
    ``mix`` as the ``lora`` field with every one of the server's ``n_adapters`` listed (None: no field)."""
    body = {"prompt": prompt, "n_predict": steps, "temperature": 0, "ignore_eos": True, "n_probs": 2, "cache_prompt": cache, **extra}
    if mix is not None:
        body["lora"] = lora(mix, n_adapters)
    r = httpx.post(f"{url}/completion", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def tokens_and_gaps(out: dict) -> tuple[list[int], list[float], list[float]]:
    """Greedy token ids, their logprobs, and the top-two logprob gap at each step."""
    probs = out["completion_probabilities"]
    toks = [p["id"] for p in probs]
    lps = [p["logprob"] for p in probs]
    gaps = [p["top_logprobs"][0]["logprob"] - p["top_logprobs"][1]["logprob"] for p in probs]
    return toks, lps, gaps


def parts_above_floor(got: dict, alone: dict) -> str | None:
    """Why ``got`` is not ``alone`` (tokens part where alone's top-two gap is above the floor), or None."""
    g, _, _ = tokens_and_gaps(got)
    a, _, gaps = tokens_and_gaps(alone)
    for t, (x, y) in enumerate(zip(g, a)):
        if x != y:
            return None if gaps[t] <= GAP_FLOOR else f"step {t}: {x} vs {y} alone (gap {gaps[t]:.2f} > {GAP_FLOOR})"
    return None


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    m = re.search(rf"^llamacpp:{name} (\S+)$", text, re.M)
    assert m, f"/metrics has no llamacpp:{name}"
    return float(m.group(1))


def test_build_prints_the_binary_and_its_version_names_the_patch(binary):
    out = subprocess.run([sys.executable, "-m", "loramux", "llama-server", "build"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(binary)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert "+loramux-" in version.stdout + version.stderr
    assert "libllama.so" in subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    lib_dir = next(
        line for line in subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout.splitlines() if "libllama" in line
    )
    from loramux.native import _loader

    assert str(_loader.find_library_dir()) in lib_dir  # the library the Python package loads


def test_props_report_the_pool(patched):
    pool = httpx.get(f"{patched}/props").json()["loramux"]
    assert pool["per_sequence"] is True and pool["n_adapters"] == len(BATCH_ADAPTERS) and pool["max_active"] == 3
    assert pool["routing_modes"] == ["arrow", "spectr"]


def test_concurrent_requests_with_different_mixes_equal_each_alone(patched, prompts):
    alone = [complete(patched, p, m) for p, m in zip(prompts, MIXES)]
    decodes_before = metric(patched, "loramux_decode_sequences_total")
    with cf.ThreadPoolExecutor(len(MIXES)) as ex:
        together = list(ex.map(lambda pm: complete(patched, *pm), zip(prompts, MIXES)))
    for m, got, want in zip(MIXES, together, alone):
        assert parts_above_floor(got, want) is None, f"mix {m}: {parts_above_floor(got, want)}"
    assert metric(patched, "loramux_decode_mixes_max") >= 2, "different mixes never shared a decode"
    assert metric(patched, "loramux_decode_sequences_max") >= 2
    assert metric(patched, "loramux_decode_sequences_total") > decodes_before
    # negative control: the oracle catches a wrong mix (the same prompt, another mix, alone)
    wrong = complete(patched, prompts[0], MIXES[2])
    assert (
        parts_above_floor(wrong, alone[0]) is not None
        or max(abs(x - y) for x, y in zip(tokens_and_gaps(wrong)[1], tokens_and_gaps(alone[0])[1])) > 10 * HOOK_LOGPROB_TOL
    )


def test_upstream_lora_contract_scale_zero_is_the_base_and_per_request_lora_in_parallel(binary, base_model, adapters, prompts):
    """The request shapes of llama.cpp's tools/server/tests/unit/test_lora.py, on the real fixtures."""
    with running_llama_server(base_model, [], n_parallel=1, n_ctx=1024, binary=binary) as bare:
        base = complete(bare, prompts[0], None)
    with running_llama_server(base_model, adapters[:1], n_parallel=4, n_ctx=4096, binary=binary) as url:
        r = httpx.post(f"{url}/lora-adapters", json=[{"id": 0, "scale": 0.0}])
        assert r.status_code == 200
        body = {"prompt": prompts[0], "n_predict": STEPS, "temperature": 0, "ignore_eos": True, "n_probs": 2}
        zero = httpx.post(f"{url}/completion", json=body, timeout=600).json()  # the global scale 0: the base model
        assert tokens_and_gaps(zero)[0] == tokens_and_gaps(base)[0]
        httpx.post(f"{url}/lora-adapters", json=[{"id": 0, "scale": 1.0}])
        scaled = httpx.post(f"{url}/completion", json=body, timeout=600).json()
        scales = [0.0, 0.0, 0.3, 0.7, 1.0, 1.0]
        solo = {s: complete(url, prompts[0], {0: s}, n_adapters=1) for s in set(scales)}
        with cf.ThreadPoolExecutor(len(scales)) as ex:
            outs = list(ex.map(lambda s: complete(url, prompts[0], {0: s}, n_adapters=1, seed=42), scales))
    assert tokens_and_gaps(scaled)[0] == tokens_and_gaps(solo[1.0])[0]  # no lora field: the global scales
    assert tokens_and_gaps(solo[0.0])[0] == tokens_and_gaps(base)[0]
    for s, out in zip(scales, outs):
        assert parts_above_floor(out, solo[s]) is None, f"scale {s}"
    assert tokens_and_gaps(solo[1.0])[1] != tokens_and_gaps(solo[0.0])[1], "the adapter should change the answer"


def test_a_cached_prefix_is_reused_under_its_own_mix_only(binary, base_model, adapters, prompts):
    p = prompts[1]
    a, b = {0: 1.0}, {1: 1.0}

    def run(url):
        complete(url, p, a, steps=2, cache=True)  # caches p under a
        other = complete(url, p, b, steps=2, cache=True)
        same = complete(url, p, b, steps=2, cache=True)
        no_field = complete(url, p, None, steps=2, cache=True)  # the server's global scales
        return other, same, no_field

    with running_llama_server(base_model, adapters, n_parallel=1, n_ctx=2048, binary=binary) as url:
        other, same, no_field = run(url)
        fresh_b = complete(url, p, b, steps=2)
    assert other["timings"]["cache_n"] == 0, "a prefix cached under mix a was reused under mix b"
    assert same["timings"]["cache_n"] > 0, "the prefix cached under mix b was not reused under mix b"
    assert no_field["timings"]["cache_n"] == 0
    assert tokens_and_gaps(other)[1] == pytest.approx(tokens_and_gaps(fresh_b)[1], abs=HOOK_LOGPROB_TOL)
    # negative control: stock llama-server reuses the prefix for a request without lora (#26207)
    llama_server_binary()
    with running_llama_server(base_model, adapters, n_parallel=1, n_ctx=2048) as stock:
        _, _, stock_no_field = run(stock)
    assert stock_no_field["timings"]["cache_n"] > 0


def test_the_ram_prompt_cache_is_keyed_by_mix(binary, base_model, adapters, prompts):
    p, q = prompts[1], prompts[4]
    a, b = {0: 1.0}, {1: 1.0}
    with running_llama_server(base_model, adapters, n_parallel=1, n_ctx=2048, binary=binary, extra_args=["--cache-ram", "256"]) as url:
        complete(url, p, a, steps=2, cache=True)
        complete(url, q, a, steps=2, cache=True)  # p's state goes to the RAM cache
        other = complete(url, p, b, steps=2, cache=True)
        complete(url, q, a, steps=2, cache=True)
        same = complete(url, p, b, steps=2, cache=True)
    assert other["timings"]["cache_n"] == 0, "the RAM cache gave mix b the K/V of mix a"
    assert same["timings"]["cache_n"] > 0, "the RAM cache did not restore the prefix cached under the same mix"


def test_stock_behaviour_without_adapters(binary, base_model, prompts):
    llama_server_binary()
    with running_llama_server(base_model, [], n_parallel=2, n_ctx=2048, binary=binary) as url:
        ours = complete(url, prompts[0], None)
        assert httpx.get(f"{url}/props").json()["loramux"]["per_sequence"] is False  # no --lora: no pool
    with running_llama_server(base_model, [], n_parallel=2, n_ctx=2048) as url:
        stock = complete(url, prompts[0], None)
    assert tokens_and_gaps(ours)[0] == tokens_and_gaps(stock)[0]
    assert tokens_and_gaps(ours)[1] == pytest.approx(tokens_and_gaps(stock)[1], abs=POOL_STOCK_LOGIT_TOL)


def test_bad_input_is_refused_and_nothing_else_is_affected(patched, prompts):
    good = complete(patched, prompts[0], MIXES[0])
    bad = [
        ({"lora": [{"id": 9, "scale": 1.0}]}, "out of range"),
        ({"lora": [{"id": 0, "scale": 1e39}]}, "finite"),
        ({"lora_routing": {"mode": "arrow", "k": 9}}, "--lora-max-active"),
        ({"lora_routing": {"mode": "nope", "k": 1}}, "arrow"),
    ]
    for extra, words in bad:
        r = httpx.post(f"{patched}/completion", json={"prompt": "hi", "n_predict": 2, **extra}, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (extra, r.text)
    r = httpx.post(f"{patched}/completion", content=b'{"prompt": "hi", "lora": [{"id": 0, "scale": NaN}]}', timeout=60)
    assert r.status_code == 400, r.text
    with cf.ThreadPoolExecutor(2) as ex:  # a bad request beside a good one
        fut = ex.submit(complete, patched, prompts[0], MIXES[0])
        r = httpx.post(f"{patched}/completion", json={"prompt": "hi", "lora": [{"id": -1, "scale": 1.0}]}, timeout=60)
        again = fut.result()
    assert r.status_code == 400
    assert parts_above_floor(again, good) is None


def test_a_mix_wider_than_max_active_runs_the_stock_way_visibly(patched, prompts):
    wide = {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}  # --lora-max-active 3
    before = metric(patched, "loramux_fallback_requests_total")
    alone = complete(patched, prompts[2], wide)
    with cf.ThreadPoolExecutor(3) as ex:
        outs = list(ex.map(lambda pm: complete(patched, *pm), [(prompts[2], wide), (prompts[0], MIXES[0]), (prompts[1], MIXES[1])]))
    assert metric(patched, "loramux_fallback_requests_total") == before + 2
    assert parts_above_floor(outs[0], alone) is None


def test_per_token_routing_in_a_request_field(patched, prompts):
    arrow = complete(patched, prompts[0], None, lora_routing={"mode": "arrow", "k": 2, "temperature": 1.0})
    spectr = complete(patched, prompts[0], None, lora_routing={"mode": "spectr", "k": 2})
    base = complete(patched, prompts[0], {})
    with cf.ThreadPoolExecutor(3) as ex:
        outs = list(
            ex.map(
                lambda extra: complete(patched, prompts[0], None if extra else {}, **extra),
                [{"lora_routing": {"mode": "arrow", "k": 2, "temperature": 1.0}}, {"lora_routing": {"mode": "spectr", "k": 2}}, {}],
            )
        )
    for got, want in zip(outs, (arrow, spectr, base)):
        assert parts_above_floor(got, want) is None
    assert tokens_and_gaps(arrow)[1] != tokens_and_gaps(base)[1], "arrow routing should change the logprobs"


def test_an_adapter_file_deleted_under_a_running_server(binary, base_model, adapters, prompts, tmp_path):
    copy = tmp_path / "gone.gguf"
    shutil.copy(adapters[0], copy)
    with running_llama_server(base_model, [copy], n_parallel=2, n_ctx=2048, binary=binary) as url:
        before = complete(url, prompts[0], {0: 1.0}, n_adapters=1)
        copy.unlink()
        after = complete(url, prompts[0], {0: 1.0}, n_adapters=1)
        assert httpx.get(f"{url}/health").status_code == 200
    assert tokens_and_gaps(after)[0] == tokens_and_gaps(before)[0]


@pytest.fixture(scope="module")
def hook(patched, small_router, base_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("hook-patched")
    with loramux_server("--upstream", patched, "--base", str(base_model), "--router", str(small_router[0]), log_dir=log_dir) as url:
        yield url


def test_the_hook_in_front_routes_auto_and_streams_what_it_answers(hook, patched):
    openai = pytest.importorskip("openai")
    whole, msgs = auto_routes_and_streams(hook)
    client = openai.OpenAI(base_url=f"{hook}/v1", api_key="unused", max_retries=0)
    mix = whole.model_extra["mix"]
    ids = {a["path"].rsplit("/", 1)[-1][:-5]: a["id"] for a in httpx.get(f"{patched}/lora-adapters").json()}
    direct = httpx.post(
        f"{patched}/v1/chat/completions",
        json={"messages": msgs, "temperature": 0, "max_tokens": 8, "lora": [{"id": i, "scale": mix.get(n, 0.0)} for n, i in ids.items()]},
        timeout=300,
    ).json()
    assert direct["choices"][0]["message"]["content"] == whole.choices[0].message.content
    assert "arrow" in [m.id for m in client.models.list().data]


def test_the_hook_forwards_per_token_routing_to_a_patched_upstream(hook, patched, prompts):
    body = {"prompt": prompts[0], "max_tokens": 8, "temperature": 0}
    via = httpx.post(f"{hook}/v1/completions", json={**body, "model": "arrow:k=2"}, timeout=300)
    assert via.status_code == 200, via.text
    direct = httpx.post(
        f"{patched}/v1/completions",
        json={**body, "lora": lora({}), "lora_routing": {"mode": "arrow", "k": 2, "temperature": 1.0}},
        timeout=300,
    ).json()
    assert via.json()["choices"][0]["text"] == direct["choices"][0]["text"]
    assert json.loads(via.headers["x-loramux-mix"]) == {"mode": "arrow", "k": 2, "temperature": 1.0} == via.json()["mix"]


def children_of(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_serve_llama_server_runs_the_patched_server_as_a_child_and_stops_it(converted_dir, base_model, tmp_path, binary):
    ads = tmp_path / "adapters"
    ads.mkdir()
    for n in BATCH_ADAPTERS[:3]:
        (ads / f"{n}.gguf").symlink_to(converted_dir / f"{n}.gguf")
    args = ("--adapters", str(ads), "--base", str(base_model), "--llama-server", "--n-seq-max", "2", "--threads", "2")
    with loramux_server_process(*args, log_dir=tmp_path) as srv:
        kids = children_of(srv.pid)
        assert kids and any(Path(f"/proc/{k}/exe").resolve() == binary.resolve() for k in kids), kids
        r = httpx.post(
            f"{srv.url}/v1/completions", json={"prompt": "not ( True ) is", "max_tokens": 4, "temperature": 0, "mix": {"navigate": 1.0}}
        )
        assert r.status_code == 200 and r.json()["mix"] == {"navigate": 1.0}, r.text
        assert "spectr" in [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
        srv.proc.terminate()
        assert srv.proc.wait(30) == 0
    deadline = time.monotonic() + 15
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(k) for k in kids), "the child llama-server outlived loramux serve"
