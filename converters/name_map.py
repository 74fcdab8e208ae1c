"""Data tables: PEFT (Hugging Face) module names -> GGUF base tensor names, per architecture.

Each entry says where it comes from, so that a new architecture is a new table row,
not new code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ArchTable:
    """How one GGUF architecture names the tensors PEFT adapts."""

    # HF module path (with {bid} for the block index) -> GGUF tensor name.
    # Source: gguf-py's TensorNameMap (MODEL_TENSOR.ATTN_Q etc.) for this arch; tests/test_name_map.py
    # checks that every entry, for every block, is the name gguf-py gives.
    modules: dict[str, str]
    # GGUF tensors whose output rows llama.cpp's HF converter permutes (rotary
    # layout), with the GGUF key holding the head count used for the permutation.
    # Source: convert_hf_to_gguf.py, LlamaModel.modify_tensors (q: n_head; k: n_head_kv).
    permuted_rows: dict[str, str] = field(default_factory=dict)


_LLAMA_LIKE_MODULES = {
    "model.embed_tokens": "token_embd.weight",  # MODEL_TENSOR.TOKEN_EMBD
    "lm_head": "output.weight",  # MODEL_TENSOR.OUTPUT
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q.weight",  # ATTN_Q
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k.weight",  # ATTN_K
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v.weight",  # ATTN_V
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output.weight",  # ATTN_OUT
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate.weight",  # FFN_GATE
    "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up.weight",  # FFN_UP
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down.weight",  # FFN_DOWN
    # Norms: never LoRA targets, listed so a GGUF base can be rebuilt as an HF model.
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm.weight",  # ATTN_NORM
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm.weight",  # FFN_NORM
    "model.norm": "output_norm.weight",  # OUTPUT_NORM
}

ARCH_TABLES: dict[str, ArchTable] = {
    # LlamaForCausalLM (SmolLM2, Llama 2/3): q and k rows permuted by the HF converter.
    "llama": ArchTable(
        modules=_LLAMA_LIKE_MODULES,
        permuted_rows={
            "attn_q": "llama.attention.head_count",
            "attn_k": "llama.attention.head_count_kv",
        },
    ),
}

_BLOCK = re.compile(r"\.(\d+)\.")


def supported_architectures() -> list[str]:
    """Architectures the converters have a name table for."""
    return sorted(ARCH_TABLES)


def gguf_tensor_name(arch: str, module: str) -> str | None:
    """The GGUF tensor a PEFT module (``model.layers.3.self_attn.q_proj``) adapts, or None."""
    table = ARCH_TABLES[arch]
    m = _BLOCK.search(module)
    if m:
        template = module[: m.start()] + ".{bid}." + module[m.end() :]
        target = table.modules.get(template)
        return target.format(bid=m.group(1)) if target else None
    return table.modules.get(module)


def permutation_key(arch: str, tensor_name: str) -> str | None:
    """GGUF key of the head count used to permute this tensor's rows, or None."""
    kind = tensor_name.split(".")[-2] if tensor_name.startswith("blk.") else ""
    return ARCH_TABLES[arch].permuted_rows.get(kind)


def hf_module_for_tensor(arch: str, tensor_name: str) -> str | None:
    """Inverse of :func:`gguf_tensor_name`: the HF module a GGUF base tensor belongs to, or None."""
    m = _BLOCK.search("." + tensor_name)
    for template, target in ARCH_TABLES[arch].modules.items():
        if m and "{bid}" in target and target.format(bid=m.group(1)) == tensor_name:
            return template.format(bid=m.group(1))
        if "{bid}" not in target and target == tensor_name:
            return template
    return None


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Apply the HF->GGUF rotary row permutation to the output rows of ``rows`` (out, ...)."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"cannot permute {out} rows into {n_head} heads")
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rows`: GGUF row order back to Hugging Face's."""
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
