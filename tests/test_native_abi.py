"""The C ABI of native/include/loramux.h: the Python side agrees with the header, and bad input
to the library gives a status and a reason that names the adapter and tensor, never an abort.

The refusal cases run in a subprocess each (the patched libllama must be loaded before
llama_cpp): a crash or an abort there fails the test with its output instead of killing pytest.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import native_missing, run_worker, write_adapter_variant

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "native" / "include" / "loramux.h"
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"


def _header_codes() -> dict[str, int]:
    text = HEADER.read_text()
    enum = re.search(r"enum loramux_status \{(.*?)\};", text, re.S)
    assert enum, f"no enum loramux_status in {HEADER}"
    return {m[0]: int(m[1]) for m in re.findall(r"(LORAMUX_\w+)\s*=\s*(-?\d+)", enum.group(1))}


def _header_functions() -> set[str]:
    return set(re.findall(r"LLAMA_API\s+[\w\s\*]+?\b(loramux_\w+)\s*\(", HEADER.read_text()))


def test_status_codes_and_version_match_the_header():
    from loramux.native import _bindings as B
    from loramux.native import _loader

    codes = _header_codes()
    assert len(codes) >= 12
    python = {k: v for k, v in vars(B).items() if re.fullmatch(r"LORAMUX_(OK|ERR_\w+)", k)}
    assert python == codes, f"native/_bindings.py status codes differ from {HEADER.name}"
    version = re.search(r"#define LORAMUX_API_VERSION (\d+)", HEADER.read_text())
    assert version and int(version.group(1)) == _loader.API_VERSION


def test_every_header_function_is_bound_and_nothing_else():
    from loramux.native import _bindings as B

    assert _header_functions() == set(B._PROTOTYPES), "native/_bindings.py prototypes differ from the header"


# ---------------------------------------------------------------- worker (subprocess) --
def _rank_600(modules) -> None:
    a, b = modules["blk.4.attn_v.weight"]
    rng = np.random.default_rng(0)
    modules["blk.4.attn_v.weight"] = (
        rng.normal(0, 1e-3, (600, a.shape[1])).astype(np.float32),
        rng.normal(0, 1e-3, (b.shape[0], 600)).astype(np.float32),
    )


def _worker(out: Path, good: Path) -> None:
    """Each refusal: (status, strerror, last_error, the SeqMixer exception text)."""
    from loramux import native

    if not native.available():
        out.write_text(json.dumps({"unavailable": native.status().reason}))
        return
    import llama_cpp as lc

    from loramux.base_model import default_base_model
    from loramux.errors import LoramuxError
    from loramux.native import _bindings as B
    from loramux.native import teacher
    from loramux.native.mixer import SeqMixer

    model = lc.llama_model_load_from_file(str(default_base_model()).encode(), lc.llama_model_default_params())
    ctx = teacher.new_context(model, n_seq_max=2, n_ctx=256, n_threads=1)
    good_ptr = lc.llama_adapter_lora_init(model, str(good).encode())
    big = lc.llama_adapter_lora_init(model, str(write_adapter_variant(good, out.with_name("rank600.gguf"), _rank_600)).encode())
    assert good_ptr and big, "llama.cpp itself refused an adapter the test meant it to load"
    report: dict[str, dict] = {}

    def attempt(label, pairs, **kw):
        try:
            SeqMixer(ctx, pairs, **kw).close()
            report[label] = {"raised": None}
        except LoramuxError as exc:
            report[label] = {"raised": str(exc)}

    attempt("rank_600", [("good", good_ptr), ("big", big)])
    attempt("duplicate", [("one", good_ptr), ("two", good_ptr)])
    rc = B.loramux_register_adapters(None, None, 1, 1)
    report["null_ctx"] = {"rc": rc, "reason": B.last_error()}
    arr = (ctypes.c_void_p * 1)(good_ptr if isinstance(good_ptr, int) else ctypes.cast(good_ptr, ctypes.c_void_p).value)
    rc = B.loramux_register_adapters(ctx, ctypes.cast(arr, B.llama_adapter_lora_pp), 1, 1, 6)
    report["unknown_flags"] = {"rc": rc, "reason": B.last_error()}
    mixer = SeqMixer(ctx, [("good", good_ptr)], max_active=1)
    report["registered_reason_cleared"] = {"reason": B.last_error()}
    for label, call in {"bad_seq": lambda: mixer.set(7, {"good": 1.0}), "nan_weight": lambda: mixer.set(0, {"good": float("nan")})}.items():
        try:
            call()
            report[label] = {"raised": None}
        except LoramuxError as exc:
            report[label] = {"raised": str(exc)}
    mixer.set(1, {"good": 0.5})
    attempt("rank_600_over_a_pool", [("good", good_ptr), ("big", big)])
    report["pool_kept"] = {"n_adapters": B.loramux_n_adapters(ctx), "mix": mixer.get(1)}
    rc = B.loramux_set_seq_mix(ctx, 0, -1, None, None)
    report["negative_n"] = {"rc": rc, "reason": B.last_error()}
    report["applied"] = {"rc": B.loramux_check_applied(ctx)}
    mixer.close()
    report["unregister_twice"] = {"rc": B.loramux_unregister(ctx), "reason": B.last_error()}
    out.write_text(json.dumps(report))


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, base_model, shared_dir) -> dict:
    from loramux.converters import convert_peft_to_gguf

    tmp = tmp_path_factory.mktemp("abi")
    good = convert_peft_to_gguf(FIXTURES / "causal_judgement", base_model, tmp / "causal_judgement.gguf", outtype="f32")
    out = tmp / "report.json"
    run_worker(__file__, out, good)
    report = json.loads(out.read_text())
    if "unavailable" in report:
        native_missing(str(report["unavailable"]))
    return report


def test_a_rank_above_the_limit_is_refused_naming_adapter_and_tensor(refusals):
    msg = refusals["rank_600"]["raised"]
    assert msg and "'big'" in msg and "blk.4.attn_v.weight" in msg and "rank 600" in msg, msg


def test_a_refused_pool_leaves_the_registered_one_in_place(refusals):
    assert refusals["rank_600_over_a_pool"]["raised"]
    assert refusals["pool_kept"] == {"n_adapters": 1, "mix": {"good": 0.5}}


def test_the_same_adapter_twice_is_refused_by_name(refusals):
    msg = refusals["duplicate"]["raised"]
    assert msg and "'two'" in msg and "'one'" in msg, msg


def test_null_and_negative_arguments_return_a_status_and_a_reason(refusals):
    from loramux.native import _bindings as B

    assert refusals["null_ctx"]["rc"] == B.LORAMUX_ERR_NULL_ARG and "NULL" in refusals["null_ctx"]["reason"]
    assert refusals["unknown_flags"]["rc"] == B.LORAMUX_ERR_BAD_ARG and "unknown flags 6" in refusals["unknown_flags"]["reason"]
    assert refusals["negative_n"]["rc"] == B.LORAMUX_ERR_BAD_ARG and "negative" in refusals["negative_n"]["reason"]
    assert refusals["registered_reason_cleared"]["reason"] == "", "a successful call left an old reason behind"
    assert refusals["applied"]["rc"] == B.LORAMUX_OK
    assert refusals["unregister_twice"]["rc"] == B.LORAMUX_ERR_NOT_REGISTERED and refusals["unregister_twice"]["reason"]


def test_mix_errors_name_the_sequence_and_the_cause(refusals):
    assert "sequence 7" in refusals["bad_seq"]["raised"] and "[0, 2)" in refusals["bad_seq"]["raised"]
    assert "'good'" in refusals["nan_weight"]["raised"] and "NaN" in refusals["nan_weight"]["raised"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
