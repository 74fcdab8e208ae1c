"""The one place where LoRA scale conventions and tensor layouts are written down.

PEFT (the source of truth)::

    delta_W = scaling * B @ A          A: (r, in)   B: (out, r)
    scaling = alpha / r                 or alpha / sqrt(r) with use_rslora
    (r, alpha) per module may be overridden by rank_pattern / alpha_pattern.
    Embedding LoRA: lora_embedding_A: (r, vocab), lora_embedding_B: (dim, r);
    the delta of the embedding matrix E (vocab, dim) is scaling * (B @ A).T.

llama.cpp (what a GGUF adapter means at run time)::

    y = W x + sum_i s_i * k_i * B_i (A_i x)
    k_i = alpha_file / r_i     if alpha_file != 0 else 1
    s_i = the user scale, r_i = lora_b.ne[0] (the rank), alpha_file = adapter.lora.alpha

One alpha per file, so loramux writes ``alpha_file`` = the config's ``lora_alpha``
and folds the per-module remainder into B::

    B_file = B * fold,   fold = peft_scaling(module) / llama_scaling(alpha_file, r)

For a plain adapter fold == 1 and the file holds PEFT's arrays unchanged (so it
agrees tensor for tensor with llama.cpp's own converter); rsLoRA, rank_pattern
and alpha_pattern modules get fold != 1 and stay exact.

GGUF tensor layouts (ggml ``ne`` order is numpy's shape reversed)::

    <base>.lora_a   ne = [in, r]     numpy (r, in)    = PEFT A
    <base>.lora_b   ne = [r, out]    numpy (out, r)   = PEFT B * fold
    token_embd.weight.lora_a  ne = [r, vocab]  numpy (vocab, r) = PEFT lora_embedding_A.T
    token_embd.weight.lora_b  ne = [r, dim]    numpy (dim, r)   = PEFT lora_embedding_B * fold

Mixes: ``{name: w}`` means the output-space sum ``sum_a w_a * delta_W_a x``, which is
what llama.cpp computes when several adapters are set with user scales ``w_a``.
"""

from __future__ import annotations

import math


def peft_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's ``scaling`` for one module: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def llama_scaling(alpha_file: float, rank: int) -> float:
    """The factor llama.cpp applies at user scale 1.0 (``llama_adapter_lora_weight::get_scale``)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha_file / rank if alpha_file else 1.0


def fold_factor(scaling: float, alpha_file: float, rank: int) -> float:
    """The factor folded into B so that llama.cpp's scale reproduces PEFT's ``scaling``."""
    return scaling / llama_scaling(alpha_file, rank)
