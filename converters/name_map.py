"""PEFT (Hugging Face) module names -> GGUF base tensor names, and what happens to a weight on the way.

Names come from gguf-py itself (``gguf.get_tensor_name_map``, the ``TensorNameMap`` that
llama.cpp's ``convert_hf_to_gguf.py`` uses), for every architecture gguf-py knows. What
llama.cpp's HF converter does to an adapted weight besides renaming it is one row of
:data:`ARCHITECTURES` per GGUF architecture, each sourced to the model class of the pinned
``convert_hf_to_gguf.py`` (``conversion/*.py`` in llama-cpp-python 0.3.36's vendored llama.cpp).
An architecture without a row is refused: its transforms have not been checked against an oracle.

A new architecture is a new row (docs/architectures.md says how to add and test one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

import numpy as np

# What an adapted module may not be, on any architecture: (pattern on the HF module name, why).
# llama.cpp stores a layer's experts as one 3-D tensor (ffn_{gate,up,down}_exps) and applies a
# LoRA to it as one matrix; PEFT's per-expert (or 3-D parameter) A/B pairs are a different delta.
_EXPERT_REFUSAL = (
    r"\.experts\b",
    "is a mixture-of-experts expert weight: llama.cpp keeps each layer's experts in one 3-D tensor "
    "(ffn_*_exps) and has no per-expert LoRA. Convert the attention (and shared-expert) modules only "
    "(retrain with target_modules that leave the experts out), or merge the adapter into the base model",
)


@dataclass(frozen=True)
class ArchRow:
    """What llama.cpp's HF converter does to the weights PEFT adapts, for one GGUF architecture."""

    # the model class (and HF architectures) in the pinned convert_hf_to_gguf.py this row follows
    source: str
    # GGUF tensor kind -> hparam (without the "<arch>." prefix) holding the head count the
    # converter permutes its output rows by (rotary layout; LlamaModel.permute)
    permuted_rows: dict[str, str] = field(default_factory=dict)
    # (pattern on the HF module, why) of modules no LoRA file can express on this architecture
    refused: tuple[tuple[str, str], ...] = (_EXPERT_REFUSAL,)
    # what the converter adds to the base model's norm weights (Gemma's RMSNorm computes x * (1 + w));
    # never a LoRA target, needed to rebuild the base as a transformers model
    norm_shift: float = 0.0
    # transformers class a base GGUF of this architecture is rebuilt as (gguf_to_torch); None: not rebuilt
    hf_class: str | None = None
    # onnxruntime-genai's LoRA input layout is checked for this architecture against its model builder
    # (tests/test_onnx_archs.py; converters/onnx_names.py). Gemma 3: the builder fails on its config here.
    onnx: bool = False


_LLAMA_PERMUTED = {"attn_q": "attention.head_count", "attn_k": "attention.head_count_kv"}

ARCHITECTURES: dict[str, ArchRow] = {
    "llama": ArchRow(
        source="conversion/llama.py LlamaModel (LlamaForCausalLM: Llama 2/3, SmolLM2; MistralForCausalLM; "
        "MixtralForCausalLM): q and k rows permuted (LlamaModel.permute, undo_permute = True)",
        permuted_rows=_LLAMA_PERMUTED,
        hf_class="LlamaForCausalLM",
        onnx=True,
    ),
    "qwen2": ArchRow(
        source="conversion/qwen.py Qwen2Model (Qwen2ForCausalLM: Qwen2, Qwen2.5): names only",
        hf_class="Qwen2ForCausalLM",
        onnx=True,
    ),
    "qwen3": ArchRow(
        source="conversion/qwen.py Qwen3Model (Qwen3ForCausalLM): names only (q_norm/k_norm are not LoRA targets)",
        hf_class="Qwen3ForCausalLM",
        onnx=True,
    ),
    "qwen2moe": ArchRow(source="conversion/qwen.py Qwen2MoeModel (Qwen2MoeForCausalLM): experts stacked into 3-D tensors"),
    "qwen3moe": ArchRow(source="conversion/qwen.py Qwen3MoeModel (Qwen3MoeForCausalLM): experts stacked into 3-D tensors"),
    "gemma2": ArchRow(
        source="conversion/gemma.py Gemma2Model (Gemma2ForCausalLM): norm weights + 1, lm_head dropped (tied)",
        norm_shift=1.0,
        hf_class="Gemma2ForCausalLM",
        onnx=True,
    ),
    "gemma3": ArchRow(
        source="conversion/gemma.py Gemma3Model (Gemma3ForCausalLM): norm weights + 1, token_embd cut to the "
        "tokenizer's vocabulary (tied: an embedding LoRA is refused anyway)",
        norm_shift=1.0,
        hf_class="Gemma3ForCausalLM",
    ),
    "phi3": ArchRow(
        source="conversion/phi.py Phi3MiniModel (Phi3ForCausalLM: Phi-3, Phi-4): qkv_proj and gate_up_proj stay "
        "fused (attn_qkv, ffn_up), names only",
        hf_class="Phi3ForCausalLM",
        onnx=True,  # the builder unpacks qkv_proj and gate_up_proj (converters/onnx_names.py ONNX_GENAI_FUSED)
    ),
}

_BLOCK = re.compile(r"\.(\d+)\.")


class UnknownArchitecture(KeyError):
    """The architecture has no row in :data:`ARCHITECTURES`."""


def supported_architectures() -> list[str]:
    """Architectures the converters have a checked row for."""
    return sorted(ARCHITECTURES)


def arch_row(arch: str) -> ArchRow:
    """The row of ``arch``; :class:`UnknownArchitecture` when there is none."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise UnknownArchitecture(arch) from None


@lru_cache(maxsize=32)
def _tensor_name_map(arch: str, n_blocks: int):
    import gguf

    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def _name_map_for(arch: str, module: str):
    m = _BLOCK.search("." + module)
    n_blocks = int(m.group(1)) + 1 if m else 1
    return _tensor_name_map(arch, -(-n_blocks // 64) * 64)  # cached per 64 blocks


def gguf_tensor_name(arch: str, module: str) -> str | None:
    """The GGUF tensor a PEFT module (``model.layers.3.self_attn.q_proj``) adapts, per gguf-py, or None."""
    arch_row(arch)
    name = _name_map_for(arch, module).get_name(module, try_suffixes=(".weight",))
    return f"{name}.weight" if name else None


def refusal(arch: str, module: str) -> str | None:
    """Why no LoRA file can adapt ``module`` on ``arch``, or None."""
    for pattern, why in arch_row(arch).refused:
        if re.search(pattern, module):
            return why
    return None


def permutation_key(arch: str, tensor_name: str) -> str | None:
    """GGUF key of the head count used to permute this tensor's rows, or None."""
    kind = tensor_name.split(".")[-2] if tensor_name.startswith("blk.") else ""
    suffix = arch_row(arch).permuted_rows.get(kind)
    return f"{arch}.{suffix}" if suffix else None


def hf_names_for_tensors(arch: str, hf_keys: Iterable[str]) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, for the parameters of one transformers model (``state_dict`` keys).

    The inverse of :func:`gguf_tensor_name` for that model: gguf-py maps many HF spellings onto
    one GGUF name, and the model's own keys say which spelling it uses.
    """
    out: dict[str, str] = {}
    for key in hf_keys:
        module, _, suffix = key.rpartition(".")
        name = _name_map_for(arch, module).get_name(module)
        if name is not None:
            out[f"{name}.{suffix}"] = key
    return out


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
