"""(b) loramux agrees tensor for tensor with llama.cpp's ``convert_lora_to_gguf.py`` where that script is right.

The script comes from the pinned llama-cpp-python sdist (``upstream_converter``: fetched with
pip once, cached under loramux's cache folder) and runs with its vendored gguf-py, ``--base``
pointing at a config.json rebuilt from the base GGUF, ``--outtype f32``.

For plain LoRA (no rsLoRA, no rank/alpha patterns) both files must hold the same tensors,
bit for bit. For rsLoRA the script is wrong: it writes ``alpha`` and ``B`` unchanged, so
llama.cpp scales by ``alpha/r`` where PEFT uses ``alpha/sqrt(r)``; the test records that its
delta is PEFT's divided by ``sqrt(r)`` (the bug loramux fixes), and that loramux's is PEFT's.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loramux.converters import convert_peft_to_gguf, read_base_model

from conftest import EMBEDDING, FIXTURES, all_fixture_names
from peft_reference import gguf_deltas, peft_deltas, relative_error, require_train_extra
from upstream_converter import converted_by_upstream


def _config(name: str) -> dict:
    return json.loads((FIXTURES / name / "adapter_config.json").read_text())


def _is_plain(name: str) -> bool:
    c = _config(name)
    return not c.get("use_rslora") and not c.get("rank_pattern") and not c.get("alpha_pattern")


PLAIN_FIXTURES = [n for n in all_fixture_names() if _is_plain(n)]
RSLORA_FIXTURE = "dyck_languages"  # r=16, alpha=16, use_rslora
PATTERN_FIXTURE = "object_counting"  # rsLoRA + rank_pattern + alpha_pattern


@pytest.fixture(scope="module")
def upstream(base_model, shared_dir):
    require_train_extra()  # the upstream script imports torch and transformers
    names = PLAIN_FIXTURES + [RSLORA_FIXTURE, PATTERN_FIXTURE]
    return converted_by_upstream(base_model, {n: FIXTURES / n for n in names})


def _read(path):
    import gguf

    reader = gguf.GGUFReader(path)
    kv = {}
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        f = reader.fields[key]
        v = f.parts[f.data[0]]
        kv[key] = bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]
    return kv, {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), np.array(t.data)) for t in reader.tensors}


def test_plain_fixtures_are_what_the_readme_says():
    assert len(PLAIN_FIXTURES) == 17 and "word_sorting" in PLAIN_FIXTURES
    assert RSLORA_FIXTURE not in PLAIN_FIXTURES and PATTERN_FIXTURE not in PLAIN_FIXTURES


@pytest.mark.parametrize("name", PLAIN_FIXTURES)
def test_plain_fixture_matches_upstream_tensor_for_tensor(name, upstream, base_model, tmp_path):
    ours = convert_peft_to_gguf(FIXTURES / name, base_model, tmp_path / f"{name}.gguf", outtype="f32", skip_embeddings=name in EMBEDDING)
    our_kv, our_tensors = _read(ours)
    up_kv, up_tensors = _read(upstream[name])
    assert our_kv == up_kv
    if name in EMBEDDING:
        # upstream writes the embedding LoRA that crashes llama.cpp on this tied base; loramux leaves it out
        dropped = set(up_tensors) - set(our_tensors)
        assert dropped == {"token_embd.weight.lora_a", "token_embd.weight.lora_b"}
        up_tensors = {k: v for k, v in up_tensors.items() if k not in dropped}
    assert set(our_tensors) == set(up_tensors)
    for tensor, (qtype, shape, data) in our_tensors.items():
        up_qtype, up_shape, up_data = up_tensors[tensor]
        assert (qtype, shape) == (up_qtype, up_shape), tensor
        assert np.array_equal(data, up_data), f"{name}: {tensor} differs from upstream (max |diff| {np.abs(data - up_data).max():.3g})"


def test_upstream_misscales_rslora_by_sqrt_r(upstream, base_model, tmp_path):
    """The bug loramux fixes: upstream's rsLoRA delta is PEFT's divided by sqrt(r); loramux's is PEFT's."""
    info = read_base_model(base_model)
    rank = _config(RSLORA_FIXTURE)["r"]
    want = peft_deltas(base_model, FIXTURES / RSLORA_FIXTURE)
    theirs = gguf_deltas(upstream[RSLORA_FIXTURE], info)
    ours = gguf_deltas(convert_peft_to_gguf(FIXTURES / RSLORA_FIXTURE, base_model, tmp_path / "ours.gguf", outtype="f32"), info)
    assert set(theirs) == set(ours) == set(want)
    for module, delta in want.items():
        assert relative_error(theirs[module] * math.sqrt(rank), delta) < 1e-5, module
        assert relative_error(theirs[module], delta) == pytest.approx(1 - 1 / math.sqrt(rank), abs=1e-5)
        assert relative_error(ours[module], delta) < 1e-5, module


def test_upstream_misscales_every_module_of_the_pattern_fixture(upstream, base_model, tmp_path):
    """rsLoRA + rank_pattern + alpha_pattern: upstream is off by a module-dependent factor; loramux is exact."""
    info = read_base_model(base_model)
    want = peft_deltas(base_model, FIXTURES / PATTERN_FIXTURE)
    theirs = gguf_deltas(upstream[PATTERN_FIXTURE], info)
    ours = gguf_deltas(convert_peft_to_gguf(FIXTURES / PATTERN_FIXTURE, base_model, tmp_path / "ours.gguf", outtype="f32"), info)
    factors = set()
    for module, delta in want.items():
        ratio = float(np.linalg.norm(delta) / np.linalg.norm(theirs[module]))
        factors.add(round(ratio, 3))
        assert relative_error(theirs[module] * ratio, delta) < 1e-5, module  # same direction, wrong scale
        assert relative_error(ours[module], delta) < 1e-5, module
    # q_proj of layers 0-9 (r=4): x2; v_proj of layers 0-9 (alpha=32): x8; the rest (r=16): x4
    assert factors == {2.0, 4.0, 8.0}
