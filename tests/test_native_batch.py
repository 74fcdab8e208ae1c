"""BatchedGenerator and SeqMixer on the real model: continuous batching, stop conditions, errors.

Runs in a subprocess like test_native_oracle.py (the patched libllama must be loaded before
llama_cpp is first imported). Skipped when the native library is not built, unless
LORAMUX_REQUIRE_NATIVE=1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
POOL = ["boolean_expressions", "navigate", "hyperbaton", "snarks"]
PROMPTS = ["not ( True ) and ( True ) is", "If you follow these instructions, do you return to the starting point?",
           "Which sentence has the correct adjective order?", "Which statement is sarcastic?",
           "True and not False or False is", "Take 3 steps. Turn around. Take 3 steps."]


def _worker(out: Path, adapter_dir: Path) -> None:
    from loramux import native

    res: dict = {}
    if not native.available():
        out.write_text(json.dumps({"unavailable": native.status().reason}))
        return

    import llama_cpp

    from loramux.base_model import default_base_model
    from loramux.errors import LoramuxError, MixError
    from loramux.llama_runtime import silence_llama_log
    from loramux.native import BatchedGenerator, GenerationRequest
    from loramux.native import teacher

    silence_llama_log()
    llama = llama_cpp.Llama(model_path=str(default_base_model()), n_ctx=512, n_threads=1, verbose=False)
    res["library"] = native.status().library
    res["llama_cpp_lib"] = llama_cpp.llama_cpp._lib._name
    adapters = {n: llama_cpp.llama_adapter_lora_init(llama.model, str(adapter_dir / f"{n}.gguf").encode()) for n in POOL}
    prompts = [llama.tokenize(p.encode()) for p in PROMPTS]
    mixes = [{"boolean_expressions": 1.0}, {"navigate": 0.5, "hyperbaton": 0.5}, None,
             {"snarks": 1.0, "navigate": -0.3}, {"boolean_expressions": 0.7, "hyperbaton": 0.3, "snarks": 0.2},
             {"navigate": 1.0}]
    with BatchedGenerator.from_llama(llama, adapters, n_seq_max=3, n_ctx_per_seq=128, n_threads=1) as gen:
        # 6 requests through 3 slots: later ones join when earlier ones leave
        # (no stop tokens: every request runs to its own max_tokens, so they leave at known steps)
        reqs = [GenerationRequest(p, mix=m, max_tokens=4 + 3 * i, stop_tokens=(), request_id=i)
                for i, (p, m) in enumerate(zip(prompts, mixes))]
        steps_running = []
        for r in reqs:
            gen.submit(r)
        done = {}
        while gen.n_waiting or gen.n_running:
            for order, comp in gen.step():
                done[order] = comp
            steps_running.append(gen.stats.last_step_sequences)
        res["completions"] = [{"id": c.request_id, "n": len(c.tokens), "reason": c.finish_reason, "tokens": c.tokens,
                               "mix": c.mix, "text": c.text} for c in (done[o] for o in sorted(done))]
        res["running_per_step"] = steps_running
        res["steps"] = gen.stats.steps
        res["generated"] = gen.stats.tokens_generated
        # greedy through the generator == greedy of the same request alone (decisive steps only are compared by the test)
        solo = [GenerationRequest(prompts[0], mix=mixes[0], max_tokens=8, stop_tokens=(), request_id="solo")]
        res["solo_tokens"] = gen.run(solo)[0].tokens
        # sampled decoding: same seed, same tokens; other seed, (almost surely) other tokens
        def sampled(seed):
            return gen.run([GenerationRequest(prompts[1], mix=mixes[1], max_tokens=12, temperature=1.0, top_k=50,
                                              top_p=0.95, seed=seed, stop_tokens=())])[0].tokens
        res["sampled"] = [sampled(7), sampled(7), sampled(8)]
        # stop strings: the text is cut before the stop string
        first = gen.run([GenerationRequest(prompts[0], max_tokens=12, stop_tokens=())])[0]
        stop_at = first.text[2:5] if len(first.text) >= 5 else first.text
        cut = gen.run([GenerationRequest(prompts[0], max_tokens=12, stop_tokens=(), stop=[stop_at])])[0]
        res["stop"] = {"full": first.text, "stop": stop_at, "cut": cut.text, "reason": cut.finish_reason}
        # stop tokens: stopping at the first generated token
        res["stop_token"] = gen.run([GenerationRequest(prompts[0], max_tokens=12, stop_tokens={first.tokens[0]})])[0].finish_reason
        # errors name the input
        errors = {}
        for label, fn in {
            "unknown": lambda: gen.mixer.set(0, {"nope": 1.0}),
            "too_many": lambda: gen.mixer.set(0, {n: 0.25 for n in POOL}),
            "bad_seq": lambda: gen.mixer.set(99, {"navigate": 1.0}),
            "nan": lambda: gen.mixer.set(0, {"navigate": float("nan")}),
            "dense_len": lambda: gen.mixer.set_weights(0, [1.0]),
            "submit_unknown": lambda: gen.submit(GenerationRequest(prompts[0], mix={"nope": 1.0})),
        }.items():
            try:
                fn()
                errors[label] = None
            except (MixError, LoramuxError) as exc:
                errors[label] = [type(exc).__name__, str(exc)]
        res["errors"] = errors
        gen.mixer.set_weights(1, [0.0, 0.5, 0.0, 0.25])
        res["dense_get"] = gen.mixer.get(1)
    # oracle for the solo request: stock adapters on a plain context, alone, greedy
    ctx = teacher.new_context(llama.model, n_seq_max=1, n_ctx=256, n_threads=1)
    teacher.set_stock_adapters(ctx, [(adapters["boolean_expressions"], 1.0)])
    toks, logits = teacher.greedy_alone(ctx, prompts[0], 8)
    top2 = [sorted(row)[-2:] for row in logits.tolist()]
    res["solo_oracle"] = {"tokens": toks, "gaps": [b - a for a, b in top2]}
    llama_cpp.llama_free(ctx)
    # llama-cpp-python's own API keeps working on the patched library
    res["llama_api_text"] = llama.create_completion("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]
    maps = Path("/proc/self/maps")
    if maps.exists():
        res["libllama_mapped"] = sorted({line.split()[-1] for line in maps.read_text().splitlines() if "libllama" in line})
    out.write_text(json.dumps(res))


@pytest.fixture(scope="module")
def result(tmp_path_factory, base_model, shared_dir):
    from loramux.converters import convert_peft_to_gguf

    d = tmp_path_factory.mktemp("adapters")
    for n in POOL:
        convert_peft_to_gguf(FIXTURES / n, base_model, d / f"{n}.gguf")
    out = tmp_path_factory.mktemp("batch") / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    proc = subprocess.run([sys.executable, __file__, str(out), str(d)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    data = json.loads(out.read_text())
    if "unavailable" in data:
        if os.environ.get("LORAMUX_REQUIRE_NATIVE") == "1":
            pytest.fail(f"native library required but unavailable: {data['unavailable']}")
        pytest.skip(f"loramux native library not available: {data['unavailable']}")
    return data


def test_one_libllama_the_patched_one(result):
    assert result["library"] == result["llama_cpp_lib"]
    if "libllama_mapped" in result:  # Linux: exactly one libllama file mapped in the process
        assert len(result["libllama_mapped"]) == 1, result["libllama_mapped"]
    assert result["llama_api_text"].strip(), "llama-cpp-python's create_completion produced nothing"


def test_continuous_batching_joins_and_leaves(result):
    comps = result["completions"]
    assert [c["id"] for c in comps] == list(range(6))
    for i, c in enumerate(comps):
        assert c["n"] == 4 + 3 * i and c["reason"] == "length"
    running = result["running_per_step"]
    # 3 slots: requests 0-2 start together (prefill + first token in step 1); request 3 joins when
    # request 0 leaves after its 4th token, and so on; the last request (19 tokens) ends the run
    assert running[0] == 3 and max(running) == 3, running
    assert running[-1] == 1
    assert result["steps"] == len(running) > 19
    assert result["generated"] == sum(c["n"] for c in comps)


def test_greedy_matches_stock_alone_where_decisive(result):
    oracle = result["solo_oracle"]
    for t, (got, want, gap) in enumerate(zip(result["solo_tokens"], oracle["tokens"], oracle["gaps"])):
        if gap <= 2.0:  # MAX_ABS_TOL of test_native_oracle.py: below it the floor can flip the argmax
            break
        assert got == want, f"step {t}: generator {got}, stock alone {want} (gap {gap:.2f})"


def test_sampling_is_seeded(result):
    a, b, c = result["sampled"]
    assert a == b and len(a) == 12
    assert a != c


def test_stop_string_and_stop_token(result):
    s = result["stop"]
    assert s["reason"] == "stop"
    assert s["stop"] not in s["cut"] and s["full"].startswith(s["cut"])
    assert result["stop_token"] == "stop"


def test_errors_name_the_input(result):
    e = result["errors"]
    assert e["unknown"][0] == "MixError" and "nope" in e["unknown"][1]
    assert e["too_many"][0] == "MixError" and "max_active=3" in e["too_many"][1]
    assert e["bad_seq"][0] == "LoramuxError" and "99" in e["bad_seq"][1]
    assert e["nan"][0] == "MixError" and "navigate" in e["nan"][1]
    assert e["dense_len"][0] == "MixError" and "4" in e["dense_len"][1]
    assert e["submit_unknown"][0] == "MixError" and "nope" in e["submit_unknown"][1]
    assert result["dense_get"] == {"navigate": 0.5, "snarks": 0.25}  # POOL order: weights [0, .5, 0, .25]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
