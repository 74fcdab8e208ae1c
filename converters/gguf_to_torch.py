"""A GGUF base model rebuilt as a Hugging Face transformers model (dequantized), for oracles and exports.

Needs the ``train`` extra (torch, transformers). Used as the torch+PEFT reference in tests
and as the source of the ONNX base model; llama.cpp itself never needs it.
"""

from __future__ import annotations

import os
from typing import Any, Collection

import numpy as np

from .base_gguf import read_base_model
from .errors import BaseModelError, UnsupportedAdapterError
from .gguf_header import read_gguf_header
from .name_map import ARCH_TABLES, hf_module_for_tensor, permutation_key, unpermute_rows


def dequantized_tensors(base: str | os.PathLike, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of a GGUF (all, or only ``names``) as float32 numpy arrays in numpy order (ne reversed)."""
    import gguf

    # read_gguf_header, not gguf.GGUFReader: the latter spends seconds on the vocabulary arrays.
    header = read_gguf_header(base)
    raw = np.memmap(base, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    for t in header.tensors:
        if names is not None and t.name not in names:
            continue
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(t.shape))  # numpy order
        row_bytes = t.shape[0] // block * type_size
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = raw[t.offset : t.offset + n_rows * row_bytes].reshape(n_rows, row_bytes)
        out[t.name] = np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)
    return out


def hf_llama_config(base: str | os.PathLike) -> dict[str, Any]:
    """The transformers LlamaConfig fields implied by a llama GGUF's metadata and shapes."""
    info = read_base_model(base)
    if info.architecture != "llama":
        raise UnsupportedAdapterError(f"{base}: only llama bases can be rebuilt as HF models, not {info.architecture!r}")
    h = info.hparams
    dim, vocab = info.tensor_shapes["token_embd.weight"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": int(h["llama.embedding_length"]),
        "intermediate_size": int(h["llama.feed_forward_length"]),
        "num_hidden_layers": int(h["llama.block_count"]),
        "num_attention_heads": int(h["llama.attention.head_count"]),
        "num_key_value_heads": int(h.get("llama.attention.head_count_kv", h["llama.attention.head_count"])),
        "rms_norm_eps": float(h.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(h.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(h.get("llama.context_length", 2048)),
        "tie_word_embeddings": info.ties_output_to_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def hf_state_dict(base: str | os.PathLike) -> dict[str, np.ndarray]:
    """HF parameter name -> float32 array, with the llama q/k rotary row permutation undone."""
    info = read_base_model(base)
    arch = info.architecture
    if arch not in ARCH_TABLES:
        raise UnsupportedAdapterError(f"{base}: no name table for architecture {arch!r}")
    state: dict[str, np.ndarray] = {}
    for name, array in dequantized_tensors(base).items():
        module = hf_module_for_tensor(arch, name)
        if module is None:
            if name.startswith("rope_"):
                continue
            raise BaseModelError(f"{base}: tensor {name!r} has no Hugging Face counterpart in the {arch!r} table")
        key = permutation_key(arch, name)
        if key is not None:
            array = unpermute_rows(array, int(info.hparams[key]))
        state[module + ".weight"] = array
    return state


def load_hf_model(base: str | os.PathLike, dtype: str = "float32"):
    """A transformers ``LlamaForCausalLM`` holding the GGUF's (dequantized) weights, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**hf_llama_config(base))
    model = LlamaForCausalLM(config)  # on CPU: buffers such as rotary inv_freq must be real
    state = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in hf_state_dict(base).items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.eval()
    return model
