"""Data table: PEFT (Hugging Face) module names -> LoRA graph-input names of an ONNX model.

The names, layouts and scale are those of onnxruntime-genai's model builder
(``src/python/py/models/builders/base.py`` in microsoft/onnxruntime-genai, read at
commit a0c04eb1, 2026-08), so that an adapter file loramux writes feeds a model built
by that builder (once its LoRA initializers are turned into graph inputs) as well as
the base model loramux builds itself (:mod:`loramux.converters.onnx_graph`).

How the builder names things (all in ``builders/base.py``):

- ``make_attention_input_proj``: ``/model/layers.{i}/attn/{q,k,v}_proj/MatMul`` (unpacked
  when LoRA is used); ``make_attention_output_proj``: ``/model/layers.{i}/attn/o_proj/MatMul``;
  note ``attn`` where PEFT says ``self_attn``.
- ``make_mlp_proj``: ``/model/layers.{i}/mlp/{gate,up,down}_proj/MatMul``.
- ``make_lm_head``: ``/lm_head/MatMul``.
- ``make_matmul_lora``: the LoRA path of a node ``.../X/MatMul`` is ``.../X/lora_A/MatMul``
  then ``.../X/lora_B/MatMul``, added to the base MatMul; before that it multiplies
  ``lora_B`` by PEFT's ``scaling`` in place (so no separate alpha exists at run time).
- ``make_matmul_float``: a node named ``/a/b/MatMul`` reads the initializer
  ``a.b.MatMul.weight`` holding ``Linear.weight.T``, i.e. ``[in, out]``.

Hence, for a PEFT module with ``A: (r, in)``, ``B: (out, r)`` and ``scaling``::

    <prefix>.lora_A.MatMul.weight   [in, r]    = A.T
    <prefix>.lora_B.MatMul.weight   [r, out]   = (scaling * B).T
    <prefix>.MatMul.weight          [in, out]  = W.T      (the base weight)

Token embeddings get no LoRA path in the builder (``make_embedding`` is a plain Gather),
so embedding LoRA has no ONNX parameter name.
"""

from __future__ import annotations

import re

# PEFT module path (with {bid} for the block index) -> ONNX prefix of its MatMul.
# Each entry: where the builder makes that MatMul.
ONNX_GENAI_LINEARS: dict[str, str] = {
    "model.layers.{bid}.self_attn.q_proj": "model.layers.{bid}.attn.q_proj",  # make_attention_input_proj: q_matmul_basename
    "model.layers.{bid}.self_attn.k_proj": "model.layers.{bid}.attn.k_proj",  # make_attention_input_proj: k_matmul_basename
    "model.layers.{bid}.self_attn.v_proj": "model.layers.{bid}.attn.v_proj",  # make_attention_input_proj: v_matmul_basename
    "model.layers.{bid}.self_attn.o_proj": "model.layers.{bid}.attn.o_proj",  # make_attention_output_proj: o_matmul_basename
    "model.layers.{bid}.mlp.gate_proj": "model.layers.{bid}.mlp.gate_proj",  # make_mlp_proj: gate_matmul_basename
    "model.layers.{bid}.mlp.up_proj": "model.layers.{bid}.mlp.up_proj",  # make_mlp_proj: up_matmul_basename
    "model.layers.{bid}.mlp.down_proj": "model.layers.{bid}.mlp.down_proj",  # make_mlp_proj: down_matmul_basename
    "lm_head": "lm_head",  # make_lm_head: "/lm_head/MatMul" (untied heads only)
}

# Fused PEFT modules (Phi-3) that the builder unpacks before it adds LoRA paths
# (make_attention_unpacked_lora, make_mlp_unpacked_lora in builders/base.py): every part keeps the
# fused module's A and takes its own rows of B ("q": the query rows, "kv": one key/value block,
# "half": half the rows), in this order.
ONNX_GENAI_FUSED: dict[str, tuple[tuple[str, str], ...]] = {
    "model.layers.{bid}.self_attn.qkv_proj": (
        ("model.layers.{bid}.attn.q_proj", "q"),
        ("model.layers.{bid}.attn.k_proj", "kv"),
        ("model.layers.{bid}.attn.v_proj", "kv"),
    ),
    "model.layers.{bid}.mlp.gate_up_proj": (("model.layers.{bid}.mlp.gate_proj", "half"), ("model.layers.{bid}.mlp.up_proj", "half")),
}

# Suffixes appended to a prefix (make_matmul_lora + make_matmul_float, see the module docstring).
LORA_A_SUFFIX = ".lora_A.MatMul.weight"  # [in, r]   = PEFT A.T
LORA_B_SUFFIX = ".lora_B.MatMul.weight"  # [r, out]  = (PEFT scaling * B).T
BASE_WEIGHT_SUFFIX = ".MatMul.weight"  # [in, out] = Linear.weight.T

_BLOCK = re.compile(r"\.(\d+)\.")
_PARAM = re.compile(r"^(?P<prefix>.+)\.(?P<part>lora_A|lora_B)\.MatMul\.weight$")


def _template(module: str) -> tuple[str, str | None]:
    """``model.layers.3.self_attn.q_proj`` -> (``model.layers.{bid}.self_attn.q_proj``, ``"3"``); (module, None) outside a block."""
    m = _BLOCK.search(module)
    return (module[: m.start()] + ".{bid}." + module[m.end() :], m.group(1)) if m else (module, None)


def onnx_prefix(module: str) -> str | None:
    """ONNX MatMul prefix of a PEFT module (``model.layers.3.self_attn.q_proj`` -> ``model.layers.3.attn.q_proj``)."""
    template, bid = _template(module)
    target = ONNX_GENAI_LINEARS.get(template)
    return target.format(bid=bid) if target else None


def onnx_fused_parts(module: str) -> tuple[tuple[str, str], ...] | None:
    """(ONNX prefix, row block) of each part the builder unpacks a fused PEFT module into, or None."""
    template, bid = _template(module)
    parts = ONNX_GENAI_FUSED.get(template)
    return tuple((prefix.format(bid=bid), rows) for prefix, rows in parts) if parts else None


def lora_parameter_names(prefix: str) -> tuple[str, str]:
    """The (A, B) graph-input names of the LoRA path of one MatMul prefix."""
    return prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX


def split_parameter_name(name: str) -> tuple[str, str] | None:
    """``model.layers.0.attn.q_proj.lora_A.MatMul.weight`` -> (``model.layers.0.attn.q_proj``, ``lora_A``), or None."""
    m = _PARAM.match(name)
    return (m["prefix"], m["part"]) if m else None


def onnx_prefixes_for_layers(n_layers: int, *, include_lm_head: bool) -> list[tuple[str, str]]:
    """Every (PEFT module, ONNX prefix) pair of a model with ``n_layers`` blocks, in graph order."""
    pairs: list[tuple[str, str]] = []
    for bid in range(n_layers):
        for module, prefix in ONNX_GENAI_LINEARS.items():
            if "{bid}" in module:
                pairs.append((module.format(bid=bid), prefix.format(bid=bid)))
    if include_lm_head:
        pairs.append(("lm_head", ONNX_GENAI_LINEARS["lm_head"]))
    return pairs
