"""The patched library in the process, and SeqMixer on the real model: one libllama, errors that name the input.

The engine built on it (continuous batching, sampling, stops) is tested in test_engine.py.

Runs in a subprocess like test_native_oracle.py (the patched libllama must be loaded before
llama_cpp is first imported). Skipped when the native library is not built, unless
LORAMUX_REQUIRE_NATIVE=1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import native_missing, run_worker

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
POOL = ["boolean_expressions", "navigate", "hyperbaton", "snarks"]


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
    from loramux.native import teacher
    from loramux.native.mixer import SeqMixer

    silence_llama_log()
    llama = llama_cpp.Llama(model_path=str(default_base_model()), n_ctx=512, n_threads=1, verbose=False)
    res["library"] = native.status().library
    res["llama_cpp_lib"] = llama_cpp.llama_cpp._lib._name
    adapters = {n: llama_cpp.llama_adapter_lora_init(llama.model, str(adapter_dir / f"{n}.gguf").encode()) for n in POOL}
    ctx = teacher.new_context(llama.model, n_seq_max=3, n_ctx=3 * 128, n_threads=1)
    with SeqMixer(ctx, adapters, max_active=3) as mixer:
        errors = {}
        for label, fn in {
            "unknown": lambda: mixer.set(0, {"nope": 1.0}),
            "too_many": lambda: mixer.set(0, {n: 0.25 for n in POOL}),
            "bad_seq": lambda: mixer.set(99, {"navigate": 1.0}),
            "nan": lambda: mixer.set(0, {"navigate": float("nan")}),
            "dense_len": lambda: mixer.set_weights(0, [1.0]),
        }.items():
            try:
                fn()
                errors[label] = None
            except (MixError, LoramuxError) as exc:
                errors[label] = [type(exc).__name__, str(exc)]
        res["errors"] = errors
        mixer.set_weights(1, [0.0, 0.5, 0.0, 0.25])
        res["dense_get"] = mixer.get(1)
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
    run_worker(__file__, out, d)
    data = json.loads(out.read_text())
    if "unavailable" in data:
        native_missing(str(data["unavailable"]))
    return data


def test_one_libllama_the_patched_one(result):
    assert result["library"] == result["llama_cpp_lib"]
    if "libllama_mapped" in result:  # Linux: exactly one libllama file mapped in the process
        assert len(result["libllama_mapped"]) == 1, result["libllama_mapped"]
    assert result["llama_api_text"].strip(), "llama-cpp-python's create_completion produced nothing"


def test_errors_name_the_input(result):
    e = result["errors"]
    assert e["unknown"][0] == "MixError" and "nope" in e["unknown"][1]
    assert e["too_many"][0] == "MixError" and "max_active=3" in e["too_many"][1]
    assert e["bad_seq"][0] == "LoramuxError" and "99" in e["bad_seq"][1]
    assert e["nan"][0] == "MixError" and "navigate" in e["nan"][1]
    assert e["dense_len"][0] == "MixError" and "4" in e["dense_len"][1]
    assert result["dense_get"] == {"navigate": 0.5, "snarks": 0.25}  # POOL order: weights [0, .5, 0, .25]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
