"""PEFT -> onnxruntime adapter files: names, layouts, scales (checked against PEFT itself), mixes, refusals, CLI.

These tests need onnxruntime (the onnx extra) but not the ONNX base model; the end-to-end
tests on the real base are in test_onnx_base.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from loramux.cli import main as cli_main
from loramux.converters.errors import AdapterError, BaseModelMismatchError, UnsupportedAdapterError
from loramux.converters.onnx_adapter import (
    convert_peft_to_onnx_adapter,
    onnx_adapter_parameters,
    read_onnx_adapter,
    write_onnx_adapter,
)
from loramux.converters.onnx_deps import MissingExtraError
from loramux.converters.onnx_mix import mix_onnx_parameters, mix_peft_to_onnx_parameters, write_onnx_mix

from conftest import BAD_FIXTURES, EMBEDDING, FIXTURES, all_fixture_names
from peft_reference import peft_model, require_train_extra

ort = pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'loramux[onnx]') is needed")

# One fixture per PEFT feature: plain q/k/v/o, rsLoRA, rsLoRA + rank/alpha patterns, all seven
# projections stored in fp16, fp32 storage.
READBACK = ["boolean_expressions", "dyck_languages", "object_counting", "hyperbaton", "sports_understanding"]


def onnx_name(peft_module: str, part: str) -> str:
    """The onnxruntime-genai builder's name, written out here independently of converters/onnx_names.py."""
    return peft_module.replace(".self_attn.", ".attn.") + f".{part}.MatMul.weight"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- read back vs PEFT


@pytest.mark.parametrize("name", READBACK)
def test_readback_matches_peft(name, base_model, tmp_path):
    """AdapterFormat.read_adapter on the written file: every parameter equals PEFT's A.T and (scaling * B).T."""
    require_train_extra()
    from peft.tuners.lora import LoraLayer

    out = convert_peft_to_onnx_adapter(FIXTURES / name, base_model, tmp_path / f"{name}.onnx_adapter")
    fmt = ort.AdapterFormat.read_adapter(str(out))
    params = {k: v.numpy().copy() for k, v in fmt.get_parameters().items()}
    assert fmt.get_format_version() == 1

    expected: dict[str, np.ndarray] = {}
    with peft_model(base_model, FIXTURES / name) as wrapped:
        for module_name, module in wrapped.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                a = module.lora_A["default"].weight.detach().double().numpy()  # (r, in)
                b = module.lora_B["default"].weight.detach().double().numpy()  # (out, r)
                s = float(module.scaling["default"])  # PEFT's own scale
                expected[onnx_name(module_name, "lora_A")] = a.T
                expected[onnx_name(module_name, "lora_B")] = (s * b).T
    assert sorted(params) == sorted(expected)
    for key, want in expected.items():
        got = params[key]
        assert got.dtype == np.float32, key
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=key)


def test_names_and_layouts(base_model):
    params = onnx_adapter_parameters(FIXTURES / "hyperbaton", base_model)  # r=4, all seven projections
    assert len(params) == 30 * 7 * 2
    assert params["model.layers.0.attn.q_proj.lora_A.MatMul.weight"].shape == (576, 4)
    assert params["model.layers.0.attn.q_proj.lora_B.MatMul.weight"].shape == (4, 576)
    assert params["model.layers.7.attn.k_proj.lora_B.MatMul.weight"].shape == (4, 192)
    assert params["model.layers.29.mlp.gate_proj.lora_A.MatMul.weight"].shape == (576, 4)
    assert params["model.layers.29.mlp.down_proj.lora_A.MatMul.weight"].shape == (1536, 4)
    assert params["model.layers.29.mlp.down_proj.lora_B.MatMul.weight"].shape == (4, 576)
    assert not any("self_attn" in k for k in params)


def test_rank_pattern_shapes(base_model):
    params = onnx_adapter_parameters(FIXTURES / "object_counting", base_model)
    assert params["model.layers.3.attn.q_proj.lora_A.MatMul.weight"].shape == (576, 4)  # rank_pattern, layers 0-9
    assert params["model.layers.12.attn.q_proj.lora_A.MatMul.weight"].shape == (576, 16)


def test_float16_output(base_model, tmp_path):
    out = convert_peft_to_onnx_adapter(FIXTURES / "dyck_languages", base_model, tmp_path / "d.onnx_adapter", dtype="float16")
    half = read_onnx_adapter(out)
    full = onnx_adapter_parameters(FIXTURES / "dyck_languages", base_model)
    assert sorted(half) == sorted(full)
    for k, v in half.items():
        assert v.dtype == np.float16
        np.testing.assert_allclose(v.astype(np.float32), full[k], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in all_fixture_names() if n not in EMBEDDING])
def test_every_fixture_converts(name, base_model):
    params = onnx_adapter_parameters(FIXTURES / name, base_model)
    assert params and all(np.isfinite(v).all() for v in params.values())


# ---------------------------------------------------------------- refusals (same as the GGUF path)


def write_peft(folder: Path, tensors: dict[str, np.ndarray], **config) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def q_proj(a_in: int = 576, b_out: int = 576, layer: int = 0, module: str = "self_attn.q_proj") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    key = f"base_model.model.model.layers.{layer}.{module}"
    return {f"{key}.lora_A.weight": rng.normal(size=(8, a_in)), f"{key}.lora_B.weight": rng.normal(size=(b_out, 8))}


def expect_refusal(peft_dir: Path, base_model, tmp_path: Path, error: type, match: str, **kwargs) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = leftovers(out_dir)
    with pytest.raises(error, match=match):
        convert_peft_to_onnx_adapter(peft_dir, base_model, out_dir / "x.onnx_adapter", **kwargs)
    assert leftovers(out_dir) == before, "a failed conversion left a file behind"


def test_refuses_dora(base_model, tmp_path):
    expect_refusal(BAD_FIXTURES / "dora_boolean_expressions", base_model, tmp_path, UnsupportedAdapterError, "DoRA")


def test_refuses_truncated_safetensors(base_model, tmp_path):
    folder = tmp_path / "trunc"
    shutil.copytree(FIXTURES / "boolean_expressions", folder)
    st = folder / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:5000])
    expect_refusal(folder, base_model, tmp_path, AdapterError, "truncated")


def test_refuses_shapes_of_another_model(base_model, tmp_path):
    folder = write_peft(tmp_path / "wide", q_proj(a_in=640, b_out=640))
    expect_refusal(folder, base_model, tmp_path, BaseModelMismatchError, "another model")


def test_refuses_nan(base_model, tmp_path):
    tensors = q_proj()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][3, 2] = np.nan
    expect_refusal(write_peft(tmp_path / "nan", tensors), base_model, tmp_path, AdapterError, "NaN")


def test_refuses_unknown_module(base_model, tmp_path):
    folder = write_peft(tmp_path / "unknown", q_proj(module="self_attn.rotary_proj"), target_modules=["rotary_proj"])
    expect_refusal(folder, base_model, tmp_path, BaseModelMismatchError, "no LoRA input")


def test_refuses_lm_head_on_tied_base(base_model, tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "base_model.model.lm_head.lora_A.weight": rng.normal(size=(8, 576)),
        "base_model.model.lm_head.lora_B.weight": rng.normal(size=(49152, 8)),
    }
    folder = write_peft(tmp_path / "head", tensors, target_modules=["lm_head"])
    expect_refusal(folder, base_model, tmp_path, BaseModelMismatchError, "ties its output projection")


def test_refuses_pickle_unless_allowed(base_model, tmp_path):
    folder = tmp_path / "pickle"
    folder.mkdir()
    shutil.copy(FIXTURES / "boolean_expressions" / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"not really a pickle")
    expect_refusal(folder, base_model, tmp_path, AdapterError, "pickle")


def test_refuses_embedding_lora_unless_skipped(base_model, tmp_path):
    expect_refusal(FIXTURES / "word_sorting", base_model, tmp_path, UnsupportedAdapterError, "embedding")
    out = convert_peft_to_onnx_adapter(FIXTURES / "word_sorting", base_model, tmp_path / "ws.onnx_adapter", skip_embeddings=True)
    params = read_onnx_adapter(out)
    assert params and not any("embed" in k for k in params)


def test_failure_keeps_existing_output(base_model, tmp_path):
    out = tmp_path / "keep.onnx_adapter"
    out.write_bytes(b"previous content")
    with pytest.raises(UnsupportedAdapterError):
        convert_peft_to_onnx_adapter(BAD_FIXTURES / "dora_boolean_expressions", base_model, out)
    assert out.read_bytes() == b"previous content"
    assert leftovers(tmp_path) == ["keep.onnx_adapter"]


def test_missing_onnxruntime_says_which_extra(base_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'loramux\[onnx\]'"):
        convert_peft_to_onnx_adapter(FIXTURES / "boolean_expressions", base_model, tmp_path / "x.onnx_adapter")
    assert leftovers(tmp_path) == []


def test_read_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.onnx_adapter"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="not a readable onnxruntime adapter"):
        read_onnx_adapter(bad)
    with pytest.raises(AdapterError, match="no such"):
        read_onnx_adapter(tmp_path / "missing.onnx_adapter")


# ---------------------------------------------------------------- mixes (array level)


def lora_path(x: np.ndarray, params: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    a = params.get(prefix + ".lora_A.MatMul.weight")
    if a is None:
        return np.zeros((x.shape[0], 0))
    return (x @ a.astype(np.float64)) @ params[prefix + ".lora_B.MatMul.weight"].astype(np.float64)


def test_mix_is_the_weighted_sum_of_lora_paths(base_model):
    plain = onnx_adapter_parameters(FIXTURES / "boolean_expressions", base_model)  # q/k/v/o, r=8
    allseven = onnx_adapter_parameters(FIXTURES / "hyperbaton", base_model)  # all seven, r=4
    rslora = onnx_adapter_parameters(FIXTURES / "object_counting", base_model)  # q/v, ranks 4 and 16
    weights = {"p": 0.5, "h": 0.3, "o": -0.2}
    mixed = mix_onnx_parameters({"p": plain, "h": allseven, "o": rslora}, weights)
    x = np.random.default_rng(2).normal(size=(3, 576))
    for prefix, rank in [
        ("model.layers.2.attn.q_proj", 8 + 4 + 4),
        ("model.layers.20.attn.q_proj", 8 + 4 + 16),
        ("model.layers.5.attn.k_proj", 8 + 4),
        ("model.layers.5.mlp.up_proj", 4),
    ]:
        got = lora_path(x, mixed, prefix)
        want = sum(w * lora_path(x, p, prefix) for w, p in ((0.5, plain), (0.3, allseven), (-0.2, rslora)) if lora_path(x, p, prefix).size)
        assert mixed[prefix + ".lora_A.MatMul.weight"].shape[1] == rank
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert set(mixed) == set(plain) | set(allseven) | set(rslora)


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"a": float("nan")}, "finite"),
        ({"zzz": 1.0}, "not among"),
        ({"a": 0.0}, "non-zero"),
        ({"a": True}, "finite numbers"),
    ],
)
def test_mix_rejects_bad_weights(weights, match, base_model):
    params = {"a": onnx_adapter_parameters(FIXTURES / "boolean_expressions", base_model)}
    with pytest.raises(AdapterError, match=match):
        mix_onnx_parameters(params, weights)


def test_mix_file_roundtrip(base_model, tmp_path):
    dirs = {"b": FIXTURES / "boolean_expressions", "d": FIXTURES / "dyck_languages"}
    weights = {"b": 0.25, "d": 0.75}
    out = write_onnx_mix(dirs, weights, base_model, tmp_path / "mix.onnx_adapter")
    in_memory = mix_peft_to_onnx_parameters(dirs, weights, base_model)
    back = read_onnx_adapter(out)
    assert sorted(back) == sorted(in_memory)
    for k in back:
        np.testing.assert_array_equal(back[k], in_memory[k])


def test_write_keeps_arrays_alive(tmp_path):
    """OrtValue.ortvalue_from_numpy does not copy: temporaries passed in must still be written correctly."""
    rng = np.random.default_rng(3)
    want = {f"m{i}.lora_A.MatMul.weight": rng.normal(size=(16, 4)).astype(np.float32) for i in range(8)}
    out = write_onnx_adapter({k: v.copy() for k, v in want.items()}, tmp_path / "t.onnx_adapter")
    back = read_onnx_adapter(out)
    for k, v in want.items():
        np.testing.assert_array_equal(back[k], v)


# ---------------------------------------------------------------- CLI


def test_cli_convert_to_onnx(base_model, tmp_path, capsys):
    out = tmp_path / "b.onnx_adapter"
    rc = cli_main(["convert", str(FIXTURES / "boolean_expressions"), "--to", "onnx", "-o", str(out), "--base", str(base_model)])
    assert rc == 0 and str(out) in capsys.readouterr().out
    back = read_onnx_adapter(out)
    want = onnx_adapter_parameters(FIXTURES / "boolean_expressions", base_model)
    assert sorted(back) == sorted(want)
    assert all(np.array_equal(back[k], want[k]) for k in want)


def test_cli_convert_refusals(base_model, tmp_path, capsys):
    out = tmp_path / "x.onnx_adapter"
    rc = cli_main(["convert", str(BAD_FIXTURES / "dora_boolean_expressions"), "--to", "onnx", "-o", str(out)])
    assert rc == 2 and "DoRA" in capsys.readouterr().err
    rc = cli_main(["convert", str(FIXTURES / "boolean_expressions"), "--to", "onnx", "--outtype", "q8_0", "-o", str(out)])
    assert rc == 2 and "not available with --to onnx" in capsys.readouterr().err
    assert not out.exists()


def test_cli_onnx_mix(base_model, tmp_path, capsys):
    out = tmp_path / "m.onnx_adapter"
    a, b = FIXTURES / "boolean_expressions", FIXTURES / "navigate"
    rc = cli_main(["onnx-mix", f"{a}=0.6", f"{b}=0.4", "-o", str(out), "--outtype", "f16"])
    assert rc == 0
    back = read_onnx_adapter(out)
    want = mix_peft_to_onnx_parameters({"a": a, "b": b}, {"a": 0.6, "b": 0.4}, base_model, dtype="float16")
    assert sorted(back) == sorted(want) and all(np.array_equal(back[k], want[k]) for k in want)
    rc = cli_main(["onnx-mix", f"{a}", "-o", str(tmp_path / "n.onnx_adapter")])
    assert rc == 2 and "PEFT_DIR=WEIGHT" in capsys.readouterr().err
    assert not (tmp_path / "n.onnx_adapter").exists()


def test_onnx_base_without_the_extra_says_which(base_model, tmp_path, monkeypatch):
    from loramux.onnx_base import OnnxLoraModel, build_onnx_base

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'loramux\[onnx\]'"):
        build_onnx_base(base_model, tmp_path / "model.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'loramux\[onnx\]'"):
        OnnxLoraModel(tmp_path / "model.onnx")
    assert leftovers(tmp_path) == []
