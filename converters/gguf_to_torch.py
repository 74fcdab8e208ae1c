"""A GGUF base model rebuilt as a Hugging Face transformers model (dequantized), for oracles and exports.

Needs the ``train`` extra (torch, transformers). Used as the torch+PEFT reference in tests
and as the source of the ONNX base model; llama.cpp itself never needs it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Collection

import numpy as np

from .base_gguf import read_base_model
from .errors import BaseModelError, UnsupportedAdapterError
from .gguf_header import read_gguf_header
from .name_map import ARCHITECTURES, hf_names_for_tensors, permutation_key, unpermute_rows


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


# HF config field -> GGUF metadata key (after "<arch>."): read where the GGUF has the key, else the
# transformers default stays (e.g. Gemma 2 writes no rope.freq_base: 10000 on both sides).
_CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "max_position_embeddings": "context_length",
    "head_dim": "attention.key_length",
    "rope_theta": "rope.freq_base",
    "rope_local_base_freq": "rope.freq_base_swa",  # Gemma 3's sliding layers
    "sliding_window": "attention.sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "original_max_position_embeddings": "rope.scaling.original_context_length",  # Phi-3
}


def _row(base: str | os.PathLike):
    info = read_base_model(base)
    row = ARCHITECTURES.get(info.architecture)
    if row is None or row.hf_class is None:
        rebuilt = sorted(a for a, r in ARCHITECTURES.items() if r.hf_class)
        raise UnsupportedAdapterError(
            f"{base}: a {info.architecture!r} base cannot be rebuilt as a transformers model (loramux rebuilds {rebuilt})"
        )
    if any("_exps." in name for name in info.tensor_shapes):
        raise UnsupportedAdapterError(f"{base}: a mixture-of-experts base (ffn_*_exps tensors) cannot be rebuilt as a transformers model")
    return info, row


def hf_config(base: str | os.PathLike) -> dict[str, Any]:
    """The transformers config fields implied by a base GGUF's metadata and shapes (its row's ``hf_class``)."""
    info, row = _row(base)
    h, arch = info.hparams, info.architecture
    vocab = info.tensor_shapes["token_embd.weight"][1]
    config: dict[str, Any] = {
        "architectures": [row.hf_class],
        "vocab_size": vocab,
        "tie_word_embeddings": info.ties_output_to_embeddings,
        "pad_token_id": None,  # a class default (Phi-3: 32000) may lie outside the vocabulary
    }
    for field, key in _CONFIG_KEYS.items():
        value = h.get(f"{arch}.{key}")
        if value is not None and not (field == "sliding_window" and value == 0):
            config[field] = value.item() if hasattr(value, "item") else value
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    head_dim = info.head_dim
    if row.norm_shift:  # Gemma: llama.cpp scales queries by 1/sqrt(head_dim) (hparams.f_attention_scale)
        config["query_pre_attn_scalar"] = head_dim
    rope_dims = h.get(f"{arch}.rope.dimension_count")
    if rope_dims and rope_dims != head_dim:  # Phi-3: rotary on part of each head
        config["partial_rotary_factor"] = rope_dims / head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in info.tensor_shapes
    return config


def hf_llama_config(base: str | os.PathLike) -> dict[str, Any]:
    """:func:`hf_config` of a llama base (LlamaConfig fields); refuses any other architecture."""
    info = read_base_model(base)
    if info.architecture != "llama":
        raise UnsupportedAdapterError(
            f"{base}: the ONNX export (loramux onnx-base, its genai_config) is built for llama bases only, not "
            f"{info.architecture!r}; run this model through the GGUF path (loramux run, serve)"
        )
    return {"model_type": "llama", **hf_config(base)}


def _empty_model(base: str | os.PathLike):
    """The transformers model of the base's row, with its config, weights not loaded (on CPU)."""
    import transformers

    _, row = _row(base)
    cls = getattr(transformers, row.hf_class)
    config = cls.config_class(**hf_config(base))
    return cls(config)


@lru_cache(maxsize=8)
def _hf_keys(base: str, fingerprint: str) -> tuple[str, ...]:
    import torch

    with torch.device("meta"):  # names only: no weights allocated
        return tuple(_empty_model(base).state_dict())


def hf_tensor_names(base: str | os.PathLike, hf_keys: Collection[str] | None = None) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name for the base's transformers class (or for ``hf_keys``)."""
    info = read_base_model(base)
    if hf_keys is None:
        hf_keys = _hf_keys(str(base), info.fingerprint)
    return hf_names_for_tensors(info.architecture, hf_keys)


def hf_state_dict(base: str | os.PathLike, hf_keys: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """HF parameter name -> float32 array: what llama.cpp's converter did to each weight undone (row permutation, norm shift)."""
    info, row = _row(base)
    names = hf_tensor_names(base, hf_keys)
    state: dict[str, np.ndarray] = {}
    for name, array in dequantized_tensors(base).items():
        key = names.get(name)
        if key is None:
            if name.startswith("rope_"):
                continue
            raise BaseModelError(f"{base}: tensor {name!r} has no Hugging Face counterpart in {row.hf_class}")
        head_key = permutation_key(info.architecture, name)
        if head_key is not None:
            array = unpermute_rows(array, int(info.hparams[head_key]))
        if row.norm_shift and key.endswith("norm.weight"):
            array = array - np.float32(row.norm_shift)
        state[key] = array
    return state


def load_hf_model(base: str | os.PathLike, dtype: str = "float32"):
    """The transformers model (its row's ``hf_class``) holding the GGUF's dequantized weights, in eval mode."""
    import torch

    model = _empty_model(base)
    keys = list(model.state_dict())
    state = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in hf_state_dict(base, keys).items()}
    if model.config.tie_word_embeddings and "lm_head.weight" in keys:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.eval()
    return model
