"""``loramux serve`` under load and under faults, for real: server processes on loopback, real clients.

- a scaled-down soak (benchmarks/soak.py: concurrent clients, streams, deliberate cancels, six
  ways of choosing a mix), every answer checked against the same request sent alone;
- a loaded GGUF adapter deleted or replaced on disk: the loaded weights keep serving (llama.cpp
  read them at load time), loading that path again refuses other weights under the used name;
- broken adapters posted to /v1/adapters during traffic: 400 naming the file, traffic unaffected;
- the server SIGKILLed in the middle of an on-the-fly PEFT conversion: after a restart no
  partial file is used and the leftovers are removed;
- prompts at the context limit and one token over it; bodies that used to answer 500;
- schemathesis against /openapi.json for a bounded time: no 5xx.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import BAD_FIXTURES, FIXTURES, ROOT
from serve_proc import loramux_server_process

sys.path.insert(0, str(ROOT / "benchmarks"))
import soak  # noqa: E402  (benchmarks/soak.py: the load, the oracle, the checks)

N_CTX = 640  # > n_batch (512): a prompt at the limit is read in two batches
MAX_TOKENS = 6
VICTIM, SWAP = "causal_judgement", "geometric_shapes"  # GGUF files that change on disk
REPLACEMENT = "movie_recommendation"
CONVERT = "disambiguation_qa"  # r=4 on all seven projections: the slowest fixture to convert


def convert(name: str, out: Path, base: Path) -> Path:
    from loramux.converters import convert_peft_to_gguf

    return convert_peft_to_gguf(FIXTURES / name, base, out)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory, base_model) -> Path:
    """The soak's five PEFT adapters, two GGUF files that the tests change, and broken adapters in later/."""
    folder = soak.prepare_adapters(tmp_path_factory.mktemp("fault-adapters"))
    convert(VICTIM, folder / "victim.gguf", base_model)
    convert(SWAP, folder / "swap.gguf", base_model)
    later = folder / "later"
    good = convert(REPLACEMENT, later / "replacement.gguf", base_model).read_bytes()
    (later / "truncated.gguf").write_bytes(good[: len(good) // 2])
    (later / "garbage.gguf").write_bytes(os.urandom(4096))
    shutil.copytree(BAD_FIXTURES / "dora_boolean_expressions", later / "dora_boolean_expressions")
    shutil.copytree(FIXTURES / "ruin_names", later / "extra")
    (later / "bad_peft").mkdir()
    shutil.copy(FIXTURES / "navigate" / "adapter_config.json", later / "bad_peft")
    (later / "bad_peft" / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, fault_dir, base_model):
    tmp = tmp_path_factory.mktemp("fault-server")
    flags = soak.server_args(fault_dir, tmp, n_seq_max=8, n_ctx=N_CTX, threads=1, max_queue=64)  # see soak --threads
    with loramux_server_process(*flags, "--base", str(base_model), log_dir=tmp) as proc:
        yield proc
    assert "Traceback" not in proc.log.read_text(), proc.log.read_text()[-4000:]


def complete(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"max_tokens": MAX_TOKENS, "temperature": 0, **body}, timeout=120, **kw)


def text_of(url: str, model: str) -> str:
    r = complete(url, {"model": model, "prompt": "The weather today is"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# --- load ----------------------------------------------------------------------------------------
def test_scaled_down_soak_loses_nothing_and_matches_the_alone_answers(server):
    opts = soak.SoakOptions(clients=16, requests=6, max_seconds=120, max_tokens=MAX_TOKENS, prompts=2, cancel_frac=0.3, rss_bound_mib=50)
    report = soak.soak(server.url, server.pid, opts)
    failed = {k: v for k, v in report["checks"].items() if not v["ok"]}
    assert not failed, failed
    assert report["sent"] == 96 and report["complete"] + report["cancelled"] == 96
    assert report["cancelled"] > 0 and 0 < report["streamed"] < 96 and report["oracle"]["mismatch"] == 0


class Traffic:
    """Soak clients in a background thread (combos checked against their alone answers)."""

    def __init__(self, url: str, clients: int = 4, requests: int = 4) -> None:
        lora_ids = {a["id"]: a["lora_id"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]}
        self.combos = soak.make_combos(soak.load_prompts(1, 120, 1), soak.selectors(list(soak.ADAPTERS), lora_ids, None))
        self.alone = soak.run_alone(url, self.combos, MAX_TOKENS)
        opts = soak.SoakOptions(clients=clients, requests=requests, cancel_frac=0.0, seed=1)
        self.plan, self.url, self.outcomes = soak.make_plan(opts, len(self.combos)), url, []
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        self.outcomes, _ = asyncio.run(soak.run_clients(self.url, self.plan, self.combos, MAX_TOKENS, time.monotonic() + 120))

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(180)
        bad = [o for o in self.outcomes if o.kind != "complete" or soak.verdict(o, self.alone[o.combo]) == "mismatch"]
        assert len(self.outcomes) == sum(map(len, self.plan)) and not bad, bad[:3]


# --- adapters changing on disk --------------------------------------------------------------------
def test_a_loaded_gguf_deleted_on_disk_keeps_serving_until_unloaded(server, fault_dir):
    before = text_of(server.url, "victim")
    (fault_dir / "victim.gguf").unlink()
    assert text_of(server.url, "victim") == before
    mixed = complete(server.url, {"prompt": "Hello", "mix": {"victim": 0.5, "navigate": 0.5}})
    assert mixed.status_code == 200
    other = httpx.post(f"{server.url}/v1/adapters", json={"path": "later/extra"}, timeout=120)  # registers all again
    assert other.status_code == 201, other.text
    assert text_of(server.url, "victim") == before and text_of(server.url, "extra")
    again = httpx.post(f"{server.url}/v1/adapters", json={"path": "victim.gguf"})
    assert again.status_code == 404 and "victim.gguf" in again.json()["error"]["message"]
    assert "victim" in [a["id"] for a in httpx.get(f"{server.url}/v1/adapters").json()["data"]]
    assert httpx.delete(f"{server.url}/v1/adapters/victim", timeout=60).json()["deleted"] is True
    gone = complete(server.url, {"model": "victim", "prompt": "x"})  # a name no longer loaded: answered as no model
    assert gone.status_code == 200 and gone.headers["x-loramux-unknown-model"] == "victim" and gone.json()["mix"] == {}


def test_a_loaded_gguf_replaced_on_disk_keeps_its_loaded_weights(server, fault_dir):
    before = text_of(server.url, "swap")
    os.replace(fault_dir / "later" / "replacement.gguf", fault_dir / "swap.gguf")  # a new file under the old name
    assert text_of(server.url, "swap") == before
    same_name = httpx.post(f"{server.url}/v1/adapters", json={"path": "swap.gguf"}, timeout=60)
    err = same_name.json()["error"]
    assert same_name.status_code == 400 and "swap.gguf" in err["message"] and "other weights" in err["message"]
    assert err["code"] == "invalid_adapter" and err["param"] == "path"
    renamed = httpx.post(f"{server.url}/v1/adapters", json={"path": "swap.gguf", "name": "swap_v2"}, timeout=60)
    assert renamed.status_code == 201, renamed.text
    assert text_of(server.url, "swap") == before and text_of(server.url, "swap_v2")


# --- broken adapters -------------------------------------------------------------------------------
BROKEN = {
    "later/truncated.gguf": "is the file complete",
    "later/garbage.gguf": "GGUF",
    "later/dora_boolean_expressions": "DoRA",
    "later/bad_peft": "adapter_model.safetensors",
}


def test_broken_adapters_are_refused_naming_the_file_while_traffic_runs(server):
    listed = httpx.get(f"{server.url}/v1/adapters").json()["data"]
    with Traffic(server.url):
        for path, why in BROKEN.items():
            r = httpx.post(f"{server.url}/v1/adapters", json={"path": path}, timeout=120)
            err = r.json()["error"]
            assert r.status_code == 400, r.text
            assert path in err["message"] and why in err["message"] and err["code"] == "invalid_adapter"
    assert httpx.get(f"{server.url}/v1/adapters").json()["data"] == listed


def test_an_unknown_token_id_is_refused_without_failing_the_batch(server):
    with Traffic(server.url, clients=3, requests=3):
        time.sleep(0.3)
        for _ in range(3):
            r = complete(server.url, {"prompt": [1, 49152, 5]})
            assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]


# --- context limits and bad bodies ----------------------------------------------------------------
def test_a_prompt_of_the_maximum_length_answers_and_one_longer_is_refused(server):
    n = N_CTX - MAX_TOKENS
    tokens = [1] + [28] * (n - 1)
    full = complete(server.url, {"prompt": tokens, "logit_bias": soak.BAN_EOG})
    assert full.status_code == 200, full.text
    usage = full.json()["usage"]
    assert usage["prompt_tokens"] == n and usage["completion_tokens"] == MAX_TOKENS
    over = complete(server.url, {"prompt": tokens + [28]})
    err = over.json()["error"]
    assert over.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert f"{n + 1} tokens" in err["message"] and str(N_CTX) in err["message"]
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * N_CTX}]})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"


BAD_BODIES = [  # each of these answered 500 before (found by hand and by schemathesis)
    ({"prompt": "hi", "logit_bias": [None, None]}, "logit_bias"),
    ({"prompt": "hi", "temperature": 0.5, "top_k": 1.5}, "top_k"),
    ({"prompt": "hi", "temperature": 0.5, "seed": "x"}, "seed"),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": [1, 999999]}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": "hi", "temperature": 10**400}, "temperature"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[p for _, p in BAD_BODIES])
def test_bad_bodies_answer_400_in_openai_shape(server, body, param):
    import json

    r = httpx.post(f"{server.url}/v1/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    r = httpx.get(f"{server.url}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.put(f"{server.url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


# --- a conversion killed half-way -------------------------------------------------------------------
def partials(cache: Path) -> list[Path]:
    return list((cache / "adapters").glob(".*.partial")) if (cache / "adapters").is_dir() else []


def kill_during_conversion(server, cache: Path, names: list[str]) -> str:
    """POST each PEFT folder in turn; SIGKILL the server as soon as a conversion's partial file shows."""
    for name in names:
        posted = threading.Thread(target=lambda: _post_quietly(server.url, f"later/{name}"), daemon=True)
        posted.start()
        while posted.is_alive():
            if partials(cache):
                os.kill(server.pid, signal.SIGKILL)
                server.proc.wait(30)
                return name
        assert server.proc.poll() is None
    pytest.fail(f"no conversion of {names} was caught half-way (each was over before a partial file was seen)")


def _post_quietly(url: str, path: str) -> None:
    try:
        httpx.post(f"{url}/v1/adapters", json={"path": path}, timeout=120)
    except httpx.HTTPError:
        pass  # the server was killed under the request


def test_a_server_killed_during_a_peft_conversion_never_uses_a_partial_file(tmp_path, base_model):
    cache, folder = tmp_path / "home", tmp_path / "adapters"
    shutil.copytree(FIXTURES / "navigate", folder / "navigate")
    names = [f"conv{i}" for i in range(12)]
    for name in names:
        shutil.copytree(FIXTURES / CONVERT, folder / "later" / name)
    flags = ("--base", str(base_model), "--adapters", str(folder), "--n-ctx", "128", "--n-seq-max", "1", "--threads", "1")
    env = {"LORAMUX_HOME": str(cache)}
    with loramux_server_process(*flags, log_dir=tmp_path, env=env) as first:
        caught = kill_during_conversion(first, cache, names)
    left = partials(cache)
    assert left, "the kill left no partial file (it should have been caught mid-write)"
    assert not list((cache / "adapters").glob(f"{caught}-*.gguf")), "a final file appeared for a killed conversion"
    killed_pins = lambda: list(Path(tempfile.gettempdir()).glob(f"loramux-adapters-{first.pid}-*"))  # noqa: E731
    assert killed_pins(), "the killed server's private adapter copies should be left behind"
    with loramux_server_process(*flags, log_dir=tmp_path, env=env) as second:
        assert not killed_pins(), "the next server did not remove the killed one's private adapter copies"
        r = httpx.post(f"{second.url}/v1/adapters", json={"path": f"later/{caught}"}, timeout=120)
        assert r.status_code == 201, r.text
        assert complete(second.url, {"model": caught, "prompt": "Hello"}).status_code == 200
    assert not partials(cache), "the leftover partial files were not removed"
    [cached] = (cache / "adapters").glob(f"{caught}-*.gguf")
    from loramux.converters import convert_peft_to_gguf  # the same folder name: the same header

    reference = convert_peft_to_gguf(folder / "later" / caught, base_model, tmp_path / "reference.gguf")
    assert sha256(cached) == sha256(reference)


# --- schemathesis --------------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_error(tmp_path, base_model):
    pytest.importorskip("schemathesis")
    import schemathesis_run

    adapters = schemathesis_run.prepare_adapters(tmp_path / "adapters")
    flags = ("--base", str(base_model), "--adapters", str(adapters), "--n-ctx", "64", "--n-seq-max", "2", "--threads", "1")
    with loramux_server_process(*flags, log_dir=tmp_path) as server:
        done = schemathesis_run.run_schemathesis(server.url, max_examples=10, max_time=30, seed=1, workdir=tmp_path)
        log = server.log.read_text()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Traceback" not in log, log[-4000:]
