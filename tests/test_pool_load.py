"""Loading adapters into the pool: PEFT conversion cache, names, refusals, folders with unsupported adapters."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from loramux.errors import AdapterError, BaseModelMismatchError, LoramuxError, MixError, RuntimeLoadError, UnsupportedAdapterError
from loramux.llama_runtime import LoraAdapterHandle
from loramux.pool import AdapterPool, AdapterSkippedWarning, converted_adapter_path

from conftest import FIXTURES

CTX = dict(n_ctx=512)


@pytest.fixture(scope="module")
def pool(base_model):
    with AdapterPool(base_model, **CTX) as p:
        yield p


def write_adapter(path, arch, tensors):
    """A small GGUF LoRA file written with gguf-py (tensors: name -> numpy array in file layout)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    for name, arr in tensors.items():
        w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_peft_folder_is_converted_once_into_a_content_keyed_cache(tmp_path, monkeypatch, base_model):
    monkeypatch.setenv("LORAMUX_HOME", str(tmp_path / "home"))
    src = FIXTURES / "sports_understanding"
    with AdapterPool(base_model, **CTX) as p:
        info = p.load(src)
        assert info.from_peft and info.gguf_path.is_file()
        assert info.gguf_path.parent == tmp_path / "home" / "adapters"
        stamp = info.gguf_path.stat().st_mtime_ns
    with AdapterPool(base_model, **CTX) as p:
        again = p.load(src)
    assert again.gguf_path == info.gguf_path and again.gguf_path.stat().st_mtime_ns == stamp  # no reconversion
    assert again.sha256 == info.sha256
    # the key covers the converter settings: another setting is another cache entry
    from loramux.converters import read_base_model

    other = converted_adapter_path(src, read_base_model(base_model), outtype="f32")
    assert other != info.gguf_path


def test_a_name_is_never_reused_for_other_weights(pool, converted_dir):
    first = pool.load(converted_dir / "boolean_expressions.gguf", name="shared_name")
    assert pool.load(converted_dir / "boolean_expressions.gguf", name="shared_name") is first
    with pytest.raises(AdapterError, match="never reused"):
        pool.load(converted_dir / "navigate.gguf", name="shared_name")
    assert pool.adapters["shared_name"].sha256 == first.sha256


def test_adapter_for_another_architecture_is_refused_by_name(pool, tmp_path):
    bad = write_adapter(
        tmp_path / "gpt2_lora.gguf",
        "gpt2",
        {"blk.0.attn_q.weight.lora_a": np.zeros((8, 576)), "blk.0.attn_q.weight.lora_b": np.zeros((576, 8))},
    )
    with pytest.raises(BaseModelMismatchError, match="'gpt2_lora'.*architecture 'gpt2'"):
        pool.load(bad)
    assert "gpt2_lora" not in pool.names


def test_adapter_with_misfit_shapes_is_refused_by_name(pool, tmp_path):
    bad = write_adapter(
        tmp_path / "wide.gguf",
        "llama",
        {"blk.0.attn_q.weight.lora_a": np.zeros((8, 100)), "blk.0.attn_q.weight.lora_b": np.zeros((576, 8))},
    )
    with pytest.raises(BaseModelMismatchError, match=r"'wide'.*blk\.0\.attn_q\.weight.*do not fit"):
        pool.load(bad)
    missing = write_adapter(
        tmp_path / "ghost.gguf",
        "llama",
        {"blk.99.attn_q.weight.lora_a": np.zeros((8, 576)), "blk.99.attn_q.weight.lora_b": np.zeros((576, 8))},
    )
    with pytest.raises(BaseModelMismatchError, match="'ghost'.*does not have"):
        pool.load(missing)


def test_llama_cpp_refusal_becomes_runtime_load_error_with_its_reason(pool, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(RuntimeLoadError, match=r"'junk'.*junk\.gguf.*:.+"):
        LoraAdapterHandle(pool.model.model, junk, "junk")
    with pytest.raises(AdapterError, match="'junk'"):  # the pool's own check refuses it first
        pool.load(junk)


def test_folder_skips_the_embedding_adapter_with_a_warning_unless_asked(tmp_path, base_model, converted_dir):
    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in ("boolean_expressions", "word_sorting"):
        (folder / name).symlink_to(FIXTURES / name, target_is_directory=True)
    (folder / "snarks.gguf").symlink_to(converted_dir / "snarks.gguf")  # GGUF files and PEFT folders side by side
    (folder / "notes.txt").write_text("not an adapter")
    with AdapterPool(base_model, **CTX) as p:
        with pytest.warns(AdapterSkippedWarning, match="'word_sorting'.*token embeddings"):
            report = p.load_adapters(folder)
        assert [a.name for a in report.loaded] == ["boolean_expressions", "snarks"]
        assert [s.name for s in report.skipped] == ["word_sorting"]
        assert p.names == ["boolean_expressions", "snarks"]
        assert p.adapters["boolean_expressions"].from_peft and not p.adapters["snarks"].from_peft
        with pytest.raises(UnsupportedAdapterError, match="--skip-embeddings"):
            p.load_adapters(folder / "word_sorting")  # named on its own: strict
    with AdapterPool(base_model, **CTX) as p, warnings.catch_warnings():
        warnings.simplefilter("error", AdapterSkippedWarning)
        report = p.load_adapters(folder, skip_embeddings=True)
        assert p.names == ["boolean_expressions", "snarks", "word_sorting"] and not report.skipped
        assert p.adapters["word_sorting"].skip_embeddings
        out = p.create_completion("Sort: b a", mix={"word_sorting": 1.0}, temperature=0, max_tokens=4)  # runs, no abort
        assert out["mix"] == {"word_sorting": 1.0}


def test_unknown_names_in_a_request_list_the_known_ones(pool, converted_dir):
    pool.load(converted_dir / "snarks.gguf")
    with pytest.raises(MixError, match=r"'nope'.*known adapters: .*snarks"):
        pool.create_chat_completion([{"role": "user", "content": "hi"}], mix={"nope": 1.0})
    with pytest.raises(MixError, match="finite"):
        pool.create_completion("hi", mix={"snarks": float("inf")})


def test_close_frees_adapters_and_refuses_later_requests(base_model, converted_dir):
    p = AdapterPool(base_model, **CTX)
    p.load(converted_dir / "navigate.gguf")
    handle = p.held()["navigate"]
    p.create_completion("Hi", mix={"navigate": 1.0}, temperature=0, max_tokens=1)
    p.close()
    p.close()
    assert handle.freed
    with pytest.raises(LoramuxError, match="closed"):
        p.create_completion("Hi")


def test_missing_paths_and_empty_folders_are_clear_errors(pool, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        pool.load_adapters(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapters in"):
        pool.load_adapters(tmp_path / "empty")


def test_unload_frees_an_adapter_and_refuses_it_in_new_requests(base_model, converted_dir):
    with AdapterPool(base_model, **CTX) as p:
        p.load(converted_dir / "navigate.gguf")
        p.load(converted_dir / "snarks.gguf")
        handle = p.held()["navigate"]
        p.unload("navigate")
        assert handle.freed and p.names == ["snarks"]
        with pytest.raises(MixError, match="'navigate'.*known adapters: snarks"):
            p.create_completion("Hi", mix={"navigate": 1.0})
        assert p.create_completion("Hi", mix={"snarks": 1.0}, temperature=0, max_tokens=2)["mix"] == {"snarks": 1.0}
        with pytest.raises(AdapterError, match="not loaded"):
            p.unload("navigate")
