"""(d) Every bad input gets its own message (naming the input and what to do) and leaves no file.

Bad inputs are built from the real fixtures (copied and modified in tmp_path), plus the
real DoRA checkpoint in ../shared/fixtures/bad-adapters/. Each case runs through the
library API and through the ``loramux convert`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import save_file

from loramux.cli import main as cli_main
from loramux.converters import (
    AdapterError,
    BaseModelError,
    BaseModelMismatchError,
    UnsupportedAdapterError,
    convert_peft_to_gguf,
)
from loramux.converters.atomic import atomic_output
from loramux.converters.safetensors_file import read_safetensors

from conftest import BAD_FIXTURES, FIXTURES

PLAIN = "boolean_expressions"  # r=8, q/k/v/o, bf16
PREFIX = "base_model.model."


# ------------------------------------------------------------------ builders


def copy_fixture(tmp_path: Path, name: str = PLAIN, source: Path = FIXTURES) -> Path:
    dest = tmp_path / f"bad_{name}"
    shutil.copytree(source / name, dest)
    return dest


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def edit_tensors(folder: Path, change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Path:
    """Rewrite adapter_model.safetensors (as F32) after ``change`` edits the name -> array dict."""
    path = folder / "adapter_model.safetensors"
    arrays, _ = read_safetensors(path)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in change(dict(arrays)).items()}, str(path))
    return folder


def rename_modules(old: str, new: str):
    def change(arrays):
        return {k.replace(old, new): v for k, v in arrays.items()}

    return change


def add_tensor(name: str, array: np.ndarray):
    def change(arrays):
        arrays[PREFIX + name] = array
        return arrays

    return change


def poison(value: float):
    def change(arrays):
        key = sorted(arrays)[3]
        arrays[key] = arrays[key].copy()
        arrays[key][0, 1] = value
        return arrays

    return change


def other_model_shapes(arrays):
    """q_proj pairs as a 640-wide model would have them (e.g. an adapter trained on a bigger SmolLM2)."""
    rng = np.random.default_rng(0)
    for key in list(arrays):
        if ".q_proj.lora_A" in key:
            arrays[key] = rng.standard_normal((8, 640)).astype(np.float32)
        elif ".q_proj.lora_B" in key:
            arrays[key] = rng.standard_normal((640, 8)).astype(np.float32)
    return arrays


def gpt2_names(arrays):
    """The same weights named as a GPT-2 (fused c_attn) adapter would name them."""
    out = {}
    for key, value in arrays.items():
        key = key.replace("model.layers.", "transformer.h.").replace("self_attn.q_proj", "attn.c_attn")
        if "attn.c_attn" in key:
            out[key] = value
    return out


def drop_b_of_first_module(arrays):
    key = sorted(k for k in arrays if ".lora_B." in k)[0]
    del arrays[key]
    return arrays


def truncate(fraction: float):
    def build(folder: Path) -> Path:
        path = folder / "adapter_model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        return folder

    return build


def corrupt_header(folder: Path) -> Path:
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    return folder


def lying_header(folder: Path) -> Path:
    """The header's first shape doubled: offsets no longer match the shape."""
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    first = sorted(k for k in header if k != "__metadata__")[0]
    header[first]["shape"] = [header[first]["shape"][0] * 2, header[first]["shape"][1]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return folder


def to_pickle(folder: Path) -> Path:
    import torch

    arrays, _ = read_safetensors(folder / "adapter_model.safetensors")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return folder


def remove(name: str):
    def build(folder: Path) -> Path:
        (folder / name).unlink()
        return folder

    return build


def write_config_text(text: str):
    def build(folder: Path) -> Path:
        (folder / "adapter_config.json").write_text(text)
        return folder

    return build


# (case id, builder(folder) -> folder, fixture to start from, error type, fragments the message must hold)
CASES = [
    ("dora-real-fixture", None, "dora", UnsupportedAdapterError, ["DoRA", "merge_and_unload"]),
    (
        "dora-magnitude-tensor",
        lambda f: edit_tensors(f, add_tensor("model.layers.0.self_attn.q_proj.lora_magnitude_vector", np.ones(576, np.float32))),
        PLAIN,
        UnsupportedAdapterError,
        ["lora_magnitude_vector", "DoRA", "merge"],
    ),
    (
        "modules-to-save-config",
        lambda f: edit_config(f, modules_to_save=["lm_head"]),
        PLAIN,
        UnsupportedAdapterError,
        ["modules_to_save", "merge"],
    ),
    (
        "modules-to-save-tensor",
        lambda f: edit_tensors(f, add_tensor("model.norm.modules_to_save.default.weight", np.ones(576, np.float32))),
        PLAIN,
        UnsupportedAdapterError,
        ["model.norm.modules_to_save", "not a LoRA A/B"],
    ),
    ("bias-all", lambda f: edit_config(f, bias="all"), PLAIN, UnsupportedAdapterError, ["bias='all'", "bias='none'"]),
    ("lora-bias", lambda f: edit_config(f, lora_bias=True), PLAIN, UnsupportedAdapterError, ["lora_bias", "merge"]),
    (
        "bias-tensor",
        lambda f: edit_tensors(f, add_tensor("model.layers.0.self_attn.q_proj.lora_B.bias", np.zeros(576, np.float32))),
        PLAIN,
        UnsupportedAdapterError,
        ["lora_B.bias", "bias"],
    ),
    (
        "unknown-target-module",
        lambda f: edit_tensors(f, rename_modules("self_attn.q_proj", "self_attn.qkv_proj")),
        PLAIN,
        BaseModelMismatchError,
        ["qkv_proj", "no counterpart"],
    ),
    (
        "layer-the-base-lacks",
        lambda f: edit_tensors(f, rename_modules("model.layers.29.", "model.layers.40.")),
        PLAIN,
        BaseModelMismatchError,
        ["model.layers.40", "blk.40", "does not have"],
    ),
    (
        "lm-head-on-tied-base",
        lambda f: edit_tensors(f, rename_modules("model.layers.0.self_attn.o_proj", "lm_head")),
        PLAIN,
        BaseModelMismatchError,
        ["lm_head", "output.weight", "ties its output projection"],
    ),
    (
        "shapes-of-another-model",
        lambda f: edit_tensors(f, other_model_shapes),
        PLAIN,
        BaseModelMismatchError,
        ["640", "576", "another model"],
    ),
    (
        "architecture-mismatch-gpt2",
        lambda f: edit_tensors(f, gpt2_names),
        PLAIN,
        BaseModelMismatchError,
        ["transformer.h.", "another architecture"],
    ),
    ("nan-weight", lambda f: edit_tensors(f, poison(float("nan"))), PLAIN, AdapterError, ["NaN/Inf", "broken"]),
    ("inf-weight", lambda f: edit_tensors(f, poison(float("inf"))), PLAIN, AdapterError, ["NaN/Inf", "broken"]),
    ("truncated-safetensors", truncate(0.6), PLAIN, AdapterError, ["adapter_model.safetensors", "truncated"]),
    ("safetensors-8-bytes", truncate(0.0), PLAIN, AdapterError, ["adapter_model.safetensors", "too short"]),
    ("corrupt-safetensors-header", corrupt_header, PLAIN, AdapterError, ["adapter_model.safetensors", "corrupt"]),
    ("safetensors-shape-lies", lying_header, PLAIN, AdapterError, ["adapter_model.safetensors", "corrupt"]),
    ("one-matrix-missing", lambda f: edit_tensors(f, drop_b_of_first_module), PLAIN, AdapterError, ["only one of its two"]),
    ("no-weights", remove("adapter_model.safetensors"), PLAIN, AdapterError, ["no adapter_model.safetensors"]),
    ("missing-config", remove("adapter_config.json"), PLAIN, AdapterError, ["no adapter_config.json", "save_pretrained"]),
    ("config-not-json", write_config_text("{'r': 8,"), PLAIN, AdapterError, ["adapter_config.json", "not valid JSON"]),
    ("config-not-object", write_config_text("[8, 16]"), PLAIN, AdapterError, ["adapter_config.json", "JSON object"]),
    ("config-without-r", lambda f: edit_config(f, r=None), PLAIN, AdapterError, ["r must be a positive number"]),
    ("config-rank-disagrees", lambda f: edit_config(f, r=16), PLAIN, AdapterError, ["rank 8", "r=16"]),
    ("peft-type-ia3", lambda f: edit_config(f, peft_type="IA3"), PLAIN, UnsupportedAdapterError, ["'IA3'", "LoRA adapters"]),
    ("peft-type-loha", lambda f: edit_config(f, peft_type="LOHA"), PLAIN, UnsupportedAdapterError, ["'LOHA'", "LoRA adapters"]),
    ("peft-type-missing", lambda f: edit_config(f, peft_type=None), PLAIN, UnsupportedAdapterError, ["peft_type is None"]),
    (
        "pickle-without-allow-pickle",
        to_pickle,
        PLAIN,
        AdapterError,
        ["adapter_model.bin", "pickle", "--allow-pickle", "safe_serialization"],
    ),
    ("embedding-lora-on-tied-base", None, "word_sorting", UnsupportedAdapterError, ["ties its output", "--skip-embeddings", "Merge"]),
]


def build_case(tmp_path: Path, builder, start: str) -> Path:
    if start == "dora":
        return copy_fixture(tmp_path, "dora_boolean_expressions", BAD_FIXTURES)
    folder = copy_fixture(tmp_path, start)
    return builder(folder) if builder else folder


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} left behind after a failed conversion"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"partial files left behind: {leftovers}"


# ------------------------------------------------------------------ the API


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_the_api(case, tmp_path, base_model, shared_dir):
    _, builder, start, error, fragments = case
    folder = build_case(tmp_path, builder, start)
    out = tmp_path / "out" / "adapter.gguf"
    out.parent.mkdir()
    with pytest.raises(error) as caught:
        convert_peft_to_gguf(folder, base_model, out)
    message = str(caught.value)
    assert str(folder) in message or folder.name in message, f"the message does not name the input: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert_no_output(out)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_the_command(case, tmp_path, base_model, shared_dir, capsys):
    _, builder, start, _, fragments = case
    folder = build_case(tmp_path, builder, start)
    out = tmp_path / "adapter.gguf"
    status = cli_main(["convert", str(folder), "--base", str(base_model), "-o", str(out)])
    err = capsys.readouterr().err
    assert status != 0
    assert "loramux convert: error:" in err and fragments[0] in err, err
    assert_no_output(out)


def test_the_installed_command_exits_non_zero(tmp_path, base_model, shared_dir):
    """The console script itself (a fresh process): DoRA refused, status 2, one clear line."""
    exe = Path(sys.executable).with_name("loramux")
    out = tmp_path / "dora.gguf"
    done = subprocess.run(
        [str(exe), "convert", str(BAD_FIXTURES / "dora_boolean_expressions"), "--base", str(base_model), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "DoRA" in done.stderr and "Traceback" not in done.stderr
    assert_no_output(out)


def test_an_existing_output_survives_a_failed_conversion(tmp_path, base_model, shared_dir):
    out = tmp_path / "adapter.gguf"
    out.write_bytes(b"previous result")
    folder = edit_tensors(copy_fixture(tmp_path), poison(float("nan")))
    with pytest.raises(AdapterError):
        convert_peft_to_gguf(folder, base_model, out)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.gguf.")] == []


def test_a_failure_while_writing_leaves_no_file(tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("disk full")
    assert_no_output(out)


# ------------------------------------------------------------------ bad base models


def _write_foreign_base(path: Path) -> Path:
    """A small real GGUF model file of another architecture (gpt2), written with gguf-py."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="gpt2")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), np.float32))
    writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((192, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_base_of_another_architecture_is_refused(tmp_path, shared_dir):
    base = _write_foreign_base(tmp_path / "gpt2.gguf")
    out = tmp_path / "out.gguf"
    with pytest.raises(UnsupportedAdapterError, match=r"architecture 'gpt2', which loramux does not convert for.*'gemma3'.*'llama'"):
        convert_peft_to_gguf(FIXTURES / PLAIN, base, out)
    assert_no_output(out)


@pytest.mark.parametrize("what", ["missing", "not-gguf", "cut-short", "an-adapter"])
def test_bad_base_model_is_refused(what, tmp_path, base_model, shared_dir):
    base = tmp_path / "base.gguf"
    if what == "not-gguf":
        base.write_text("this is not a model\n")
    elif what == "cut-short":
        base.write_bytes(Path(base_model).read_bytes()[:200_000])
    elif what == "an-adapter":
        convert_peft_to_gguf(FIXTURES / PLAIN, base_model, base)
    out = tmp_path / "out.gguf"
    with pytest.raises(BaseModelError) as caught:
        convert_peft_to_gguf(FIXTURES / PLAIN, base, out)
    assert str(base) in str(caught.value)
    expected = {"missing": "does not exist", "not-gguf": "as GGUF", "cut-short": "cut short", "an-adapter": "is a GGUF adapter"}[what]
    assert expected in str(caught.value)
    assert_no_output(out)


# ------------------------------------------------------------------ what --allow-pickle and --skip-embeddings allow


def _tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def test_pickle_converts_with_allow_pickle_and_equals_safetensors(tmp_path, base_model, shared_dir):
    folder = to_pickle(copy_fixture(tmp_path))
    from_pickle = convert_peft_to_gguf(folder, base_model, tmp_path / "pickle.gguf", outtype="f32", allow_pickle=True)
    reference = convert_peft_to_gguf(FIXTURES / PLAIN, base_model, tmp_path / "st.gguf", outtype="f32")
    a, b = _tensors(from_pickle), _tensors(reference)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # and through the command line
    status = cli_main(
        ["convert", str(folder), "--base", str(base_model), "--allow-pickle", "--outtype", "f32", "-o", str(tmp_path / "cli.gguf")]
    )
    assert status == 0 and _tensors(tmp_path / "cli.gguf").keys() == b.keys()


def test_pickle_loading_refuses_arbitrary_objects(tmp_path, base_model, shared_dir):
    """--allow-pickle still uses torch.load(weights_only=True): a pickle holding code is refused."""
    import torch

    folder = to_pickle(copy_fixture(tmp_path))
    torch.save({"payload": os.system}, folder / "adapter_model.bin")
    out = tmp_path / "out.gguf"
    with pytest.raises(AdapterError, match="weights_only=True"):
        convert_peft_to_gguf(folder, base_model, out, allow_pickle=True)
    assert_no_output(out)


def test_word_sorting_with_skip_embeddings_drops_only_the_embedding(tmp_path, base_model, shared_dir):
    out = convert_peft_to_gguf(FIXTURES / "word_sorting", base_model, tmp_path / "ws.gguf", outtype="f32", skip_embeddings=True)
    names = set(_tensors(out))
    assert not any(n.startswith("token_embd") for n in names)
    assert len(names) == 2 * 2 * 30  # q and v of 30 layers, A and B
    status = cli_main(
        ["convert", str(FIXTURES / "word_sorting"), "--base", str(base_model), "--skip-embeddings", "-o", str(tmp_path / "cli.gguf")]
    )
    assert status == 0 and (tmp_path / "cli.gguf").is_file()
