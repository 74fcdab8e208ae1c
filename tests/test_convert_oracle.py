"""(a) Oracle: for every fixture, the delta llama.cpp computes from loramux's GGUF equals PEFT's.

PEFT's own ``get_delta_weight('default')`` (a PeftModel on the real base rebuilt in
transformers) against the delta reconstructed from the written file exactly as llama.cpp
applies it (``alpha_file / lora_b.ne[0]``, rotary row order of q/k undone, the
embedding layout for token_embd); see ``peft_reference.gguf_deltas``.

Tolerances (Frobenius relative error per module, worst module of the fixture):

- f32: 1e-5 (the issue asks 1e-3; measured at most 6e-8).
- f16: 1e-3 (measured at most 3e-4, on sports_understanding whose weights are fp32;
  bf16 and fp16 checkpoints are exact in f16 up to 3e-7).
- bf16: 5e-3 (measured at most 2.5e-3, on the fp16 and fp32 checkpoints).
- q8_0: 1e-2 (measured at most 4.2e-3; lora_b rows of r < 32 values stay f16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loramux.converters import convert_peft_to_gguf, read_base_model
from loramux.converters.gguf_header import read_gguf_header
from loramux.converters.name_map import permute_rows, unpermute_rows

from conftest import EMBEDDING, FIXTURES, all_fixture_names
from floors import CONVERT_REL_TOL as TOLERANCE
from peft_reference import gguf_deltas, gguf_tensors, peft_deltas, relative_error, require_train_extra

# One fixture per PEFT configuration and source dtype also goes through bf16 and q8_0.
ALL_TYPES_FOR = {"boolean_expressions", "sports_understanding", "hyperbaton", "dyck_languages", "object_counting"}


@pytest.fixture(scope="module")
def base_info(base_model):
    return read_base_model(base_model)


def _check(name: str, got: dict, want: dict, outtype: str, expected_modules: set[str]) -> float:
    assert set(got) == expected_modules, (
        f"{name} {outtype}: modules differ; missing {sorted(expected_modules - set(got))[:3]}, extra {sorted(set(got) - expected_modules)[:3]}"
    )
    errors = {m: relative_error(got[m], want[m]) for m in got}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE[outtype], (
        f"{name} {outtype}: {worst} differs from PEFT's delta by {errors[worst]:.3g} (tolerance {TOLERANCE[outtype]})"
    )
    return errors[worst]


@pytest.mark.parametrize("name", all_fixture_names())
def test_gguf_delta_equals_peft_delta(name, base_model, base_info, tmp_path, shared_dir):
    require_train_extra()
    want = peft_deltas(base_model, FIXTURES / name)
    skip = name in EMBEDDING
    expected = {m for m in want if not (skip and m.endswith("embed_tokens"))}
    if skip:
        assert expected != set(want), "word_sorting should have an embedding LoRA in PEFT"
    outtypes = ["f32", "f16"] + (["bf16", "q8_0"] if name in ALL_TYPES_FOR else [])
    for outtype in outtypes:
        out = convert_peft_to_gguf(FIXTURES / name, base_model, tmp_path / f"{name}.{outtype}.gguf", outtype=outtype, skip_embeddings=skip)
        kv, _ = gguf_tensors(out)
        if outtype == "q8_0":
            assert "Q8_0" in kv["types"].values(), "q8_0 output holds no Q8_0 tensor"
        _check(name, gguf_deltas(out, base_info), want, outtype, expected)


def _untied_copy_of_base(base_model: Path, dest: Path) -> Path:
    """The real base re-written with a separate output.weight (a copy of token_embd), tensors bit for bit.

    SmolLM2 ties its output projection, so loramux refuses embedding LoRA on it. On an
    untied base the embedding LoRA is legal; this checks its file layout against PEFT.
    """
    import gguf

    header = read_gguf_header(base_model)
    raw = np.memmap(base_model, dtype=np.uint8, mode="r")
    writer = gguf.GGUFWriter(dest, arch="llama")
    for key, value in header.metadata.items():
        if key.startswith("llama.") and isinstance(value, int):
            writer.add_uint32(key, value)
        elif key.startswith("llama.") and isinstance(value, float):
            writer.add_float32(key, value)
    emb = next(t for t in header.tensors if t.name == "token_embd.weight")
    for name, t in [(t.name, t) for t in header.tensors] + [("output.weight", emb)]:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = t.shape[0] // block * size
        n_rows = int(np.prod(t.shape[1:]))
        data = np.asarray(raw[t.offset : t.offset + n_rows * row_bytes]).reshape(n_rows, row_bytes)
        writer.add_tensor(name, data, raw_dtype=qtype)  # byte rows: gguf-py derives the element shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_embedding_lora_layout_on_an_untied_base(base_model, tmp_path, shared_dir):
    """word_sorting's embed_tokens LoRA, converted for a base with its own output.weight, equals PEFT's delta."""
    require_train_extra()
    untied = _untied_copy_of_base(Path(base_model), tmp_path / "untied.gguf")
    info = read_base_model(untied)
    assert not info.ties_output_to_embeddings
    want = peft_deltas(base_model, FIXTURES / "word_sorting")
    for outtype in ("f32", "f16"):
        out = convert_peft_to_gguf(FIXTURES / "word_sorting", untied, tmp_path / f"ws.{outtype}.gguf", outtype=outtype)
        got = gguf_deltas(out, info)
        assert "model.embed_tokens" in got
        assert got["model.embed_tokens"].shape == (49152, 576)
        _check("word_sorting (untied base)", got, want, outtype, set(want))


def test_word_sorting_is_refused_by_default_on_the_tied_base(base_model, tmp_path, shared_dir):
    from loramux.converters import UnsupportedAdapterError

    with pytest.raises(UnsupportedAdapterError, match="ties its output projection"):
        convert_peft_to_gguf(FIXTURES / "word_sorting", base_model, tmp_path / "ws.gguf")
    assert not (tmp_path / "ws.gguf").exists()


@pytest.mark.parametrize("n_head", [9, 3])
def test_rotary_row_permutation_round_trips(n_head):
    """unpermute_rows (used by the oracle) inverts permute_rows (used by the converter)."""
    rows = np.arange(576 * 5, dtype=np.float64).reshape(576, 5) if n_head == 9 else np.arange(192 * 4.0).reshape(192, 4)
    assert not np.array_equal(permute_rows(rows, n_head), rows)
    assert np.array_equal(unpermute_rows(permute_rows(rows, n_head), n_head), rows)
