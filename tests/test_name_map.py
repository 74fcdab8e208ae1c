"""converters/name_map.py: HF -> GGUF names are gguf-py's own (TensorNameMap), for every architecture
with a row; the inverse for a transformers model's own parameters; refusals and unknown architectures."""

from __future__ import annotations

import functools

import gguf
import pytest

from loramux.converters.name_map import (
    ARCHITECTURES,
    UnknownArchitecture,
    gguf_tensor_name,
    hf_names_for_tensors,
    permutation_key,
    refusal,
)

N_BLOCKS = 40
# one spelling of every module LoRA commonly adapts, per family (Phi-3 fuses qkv and gate/up)
MODULES = {
    "default": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
    "phi3": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
}


@functools.lru_cache(maxsize=None)
def _gguf_py_map(arch: str):
    model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    return gguf.get_tensor_name_map(model_arch, N_BLOCKS)


def _gguf_py_name(arch: str, hf_module: str) -> str | None:
    name = _gguf_py_map(arch).get_name(hf_module)
    return f"{name}.weight" if name else None


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_block_module_maps_to_the_name_gguf_py_gives(arch):
    compared = 0
    for bid in range(N_BLOCKS):
        for suffix in MODULES.get(arch, MODULES["default"]):
            module = f"model.layers.{bid}.{suffix}"
            ours = gguf_tensor_name(arch, module)
            assert ours == _gguf_py_name(arch, module), f"{arch}: {module} -> {ours}"
            if not arch.endswith("moe") or "mlp" not in suffix:
                assert ours is not None and ours.startswith(f"blk.{bid}."), f"{arch}: {module} -> {ours}"
                compared += 1
    assert compared >= 4 * N_BLOCKS
    assert gguf_tensor_name(arch, "model.embed_tokens") == "token_embd.weight"


def test_the_inverse_follows_the_models_own_spelling():
    keys = ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.bias", "model.norm.weight", "lm_head.weight"]
    assert hf_names_for_tensors("qwen2", keys) == {
        "blk.3.attn_q.weight": keys[0],
        "blk.3.attn_q.bias": keys[1],
        "output_norm.weight": keys[2],
        "output.weight": keys[3],
    }


def test_only_the_llama_family_permutes_rows():
    assert permutation_key("llama", "blk.0.attn_q.weight") == "llama.attention.head_count"
    assert permutation_key("llama", "blk.0.attn_k.weight") == "llama.attention.head_count_kv"
    assert permutation_key("llama", "blk.0.attn_v.weight") is None
    for arch in ("qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
        assert permutation_key(arch, "blk.0.attn_q.weight") is None


def test_expert_modules_are_refused_by_name_and_others_are_not():
    assert "experts" in refusal("qwen2moe", "model.layers.0.mlp.experts.3.gate_proj")
    assert "experts" in refusal("llama", "model.layers.0.mlp.experts")
    assert refusal("qwen2moe", "model.layers.0.mlp.shared_expert.gate_proj") is None
    assert refusal("llama", "model.layers.0.self_attn.q_proj") is None


def test_a_module_gguf_py_does_not_know_has_no_name_and_an_unknown_arch_is_refused():
    assert gguf_tensor_name("llama", "model.layers.3.self_attn.rotary_emb") is None
    assert _gguf_py_name("llama", "model.layers.3.self_attn.rotary_emb") is None
    with pytest.raises(UnknownArchitecture):
        gguf_tensor_name("starcoder2", "model.layers.0.self_attn.q_proj")
