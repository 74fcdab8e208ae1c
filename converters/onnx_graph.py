"""An ONNX graph of a Llama-family base model whose every linear layer has LoRA graph inputs.

Built with ``onnx.helper`` from standard ONNX ops only (opset 17), from a Hugging Face
state dict and config (see :mod:`.gguf_to_torch` for getting both from a GGUF). Each
linear layer is::

    y = MatMul(x, <prefix>.MatMul.weight) + MatMul(MatMul(x, <prefix>.lora_A.MatMul.weight), <prefix>.lora_B.MatMul.weight)

where the two LoRA tensors are graph inputs whose default values (initializers) are
empty (``[in, 0]`` and ``[0, out]``), so that the model is the base model unless an
adapter (``RunOptions.add_active_adapter``) or the caller's feed gives them. Names follow
onnxruntime-genai's model builder (:mod:`.onnx_names`); each LoRA input has its own
symbolic rank dimension, so every module can have its own rank.

Inputs and outputs are those of onnxruntime-genai decoder models::

    input_ids            int64 [batch, sequence]
    attention_mask       int64 [batch, total_sequence]   (1 = attend; left padding allowed)
    position_ids         int64 [batch, sequence]
    past_key_values.N.key / .value   float [batch, n_kv_heads, past_sequence, head_dim]
    -> logits            float [batch, sequence, vocab]
    -> present.N.key / .value        float [batch, n_kv_heads, total_sequence, head_dim]

Attention is computed in plain ops (rotary embedding with HF's rotate-half layout,
grouped-query heads repeated, additive causal + padding mask), so onnxruntime on any
execution provider can run it; no contrib operator is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from . import onnx_deps
from .onnx_names import BASE_WEIGHT_SUFFIX, lora_parameter_names, onnx_prefixes_for_layers

OPSET = 17
MASK_VALUE = -1e9  # additive mask for positions that may not be attended (exp underflows to 0)


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters the graph needs (a subset of transformers' LlamaConfig)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LlamaShape":
        return cls(**{k: config[k] for k in cls.__dataclass_fields__})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def rotary_tables(shape: LlamaShape) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables ``[max_positions, head_dim]``, computed in float32 as transformers' Llama rotary does."""
    d = shape.head_dim
    inv_freq = (1.0 / (shape.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))).astype(np.float32)
    positions = np.arange(shape.max_position_embeddings, dtype=np.float32)
    freqs = np.outer(positions, inv_freq).astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


class _GraphBuilder:
    """Collects nodes, initializers, inputs and outputs; names every node like onnxruntime-genai does."""

    def __init__(self) -> None:
        self.onnx = onnx_deps.onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._consts: dict[tuple, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"/const/{len(self._consts)}", array)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        out = f"{name}/output_0"
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def value(self, name: str, elem: int, dims: list[Any]) -> Any:
        return self.onnx.helper.make_tensor_value_info(name, elem, dims)


class _LlamaGraph:
    """The pieces of the Llama graph, added to one :class:`_GraphBuilder` in topological order."""

    def __init__(self, state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
        self.onnx = onnx_deps.onnx()
        self.TP = self.onnx.TensorProto
        self.state = state
        self.s = LlamaShape.from_config(config)
        self.g = _GraphBuilder()
        self.hd, self.nh, self.nkv = self.s.head_dim, self.s.num_attention_heads, self.s.num_key_value_heads
        self.n_rep = self.nh // self.nkv
        self.prefixes = dict(onnx_prefixes_for_layers(self.s.num_hidden_layers, include_lm_head=False))
        self.cos = self.sin = self.mask = self.scale = ""  # graph names, set by add_rotary, add_mask and build_llama_graph

    def weight(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise KeyError(f"state dict has no {key!r}")
        return np.asarray(self.state[key], dtype=np.float32)

    def add_inputs(self) -> None:
        """input_ids, attention_mask, position_ids and the past key/value of every layer."""
        g, TP = self.g, self.TP
        g.inputs += [
            g.value("input_ids", TP.INT64, ["batch_size", "sequence_length"]),
            g.value("attention_mask", TP.INT64, ["batch_size", "total_sequence_length"]),
            g.value("position_ids", TP.INT64, ["batch_size", "sequence_length"]),
        ]
        for i in range(self.s.num_hidden_layers):
            for kv in ("key", "value"):
                g.inputs.append(g.value(f"past_key_values.{i}.{kv}", TP.FLOAT, ["batch_size", self.nkv, "past_sequence_length", self.hd]))

    def lora_linear(self, x: str, module: str, prefix: str, basename: str) -> str:
        """``x W^T + (x A) B`` with A and B graph inputs of their own rank dimension, empty by default."""
        g, TP = self.g, self.TP
        w = self.weight(module + ".weight")  # (out, in)
        n_out, n_in = w.shape
        base_w = g.init(prefix + BASE_WEIGHT_SUFFIX, np.ascontiguousarray(w.T))
        a_name, b_name = lora_parameter_names(prefix)
        g.init(a_name, np.zeros((n_in, 0), np.float32))
        g.init(b_name, np.zeros((0, n_out), np.float32))
        g.inputs.append(g.value(a_name, TP.FLOAT, [n_in, f"{prefix}.lora_rank_a"]))
        g.inputs.append(g.value(b_name, TP.FLOAT, [f"{prefix}.lora_rank_b", n_out]))
        y = g.op("MatMul", [x, base_w], f"{basename}/MatMul")
        xa = g.op("MatMul", [x, a_name], f"{basename}/lora_A/MatMul")
        xab = g.op("MatMul", [xa, b_name], f"{basename}/lora_B/MatMul")
        return g.op("Add", [y, xab], f"{basename}/lora/Add")

    def layer_linear(self, x: str, layer: int, module: str, basename: str) -> str:
        key = f"model.layers.{layer}.{module}"
        return self.lora_linear(x, key, self.prefixes[key], basename)

    def rms_norm(self, x: str, key: str, basename: str) -> str:
        g = self.g
        sq = g.op("Mul", [x, x], f"{basename}/Pow")
        mean = g.op("ReduceMean", [sq], f"{basename}/ReduceMean", axes=[-1], keepdims=1)
        eps = g.op("Add", [mean, g.const(self.s.rms_norm_eps, np.float32)], f"{basename}/AddEps")
        inv = g.op("Reciprocal", [g.op("Sqrt", [eps], f"{basename}/Sqrt")], f"{basename}/Reciprocal")
        normed = g.op("Mul", [x, inv], f"{basename}/Mul")
        return g.op("Mul", [normed, g.init(key, self.weight(key))], f"{basename}/MulWeight")

    def add_rotary(self) -> None:
        """cos and sin rows of each position, ``[B, 1, S, head_dim]``."""
        g = self.g
        cos_t, sin_t = rotary_tables(self.s)
        g.init("cos_cache", cos_t)
        g.init("sin_cache", sin_t)
        self.cos, self.sin = (
            g.op(
                "Unsqueeze",
                [g.op("Gather", [f"{t}_cache", "position_ids"], f"/model/rotemb/{t}/Gather"), g.const([1])],
                f"/model/rotemb/{t}/Unsqueeze",
            )
            for t in ("cos", "sin")
        )

    def add_mask(self) -> None:
        """The additive causal + padding mask ``[B, 1, S, T]``: 0 where attended, MASK_VALUE elsewhere."""
        g = self.g
        total = g.op("Gather", [g.op("Shape", ["attention_mask"], "/model/mask/Shape_T"), g.const(1)], "/model/mask/T")
        seq = g.op("Gather", [g.op("Shape", ["input_ids"], "/model/mask/Shape_S"), g.const(1)], "/model/mask/S")
        past = g.op("Sub", [total, seq], "/model/mask/P")
        keys = g.op("Range", [g.const(0), total, g.const(1)], "/model/mask/key_pos")
        queries = g.op("Range", [past, total, g.const(1)], "/model/mask/query_pos")
        causal = g.op(
            "LessOrEqual",
            [
                g.op("Unsqueeze", [keys, g.const([0])], "/model/mask/key_row"),
                g.op("Unsqueeze", [queries, g.const([1])], "/model/mask/query_col"),
            ],
            "/model/mask/causal",
        )  # [S, T]
        cast = g.op("Cast", ["attention_mask"], "/model/mask/Cast", to=self.TP.BOOL)
        padding = g.op("Unsqueeze", [cast, g.const([1, 2])], "/model/mask/pad")  # [B,1,1,T]
        allowed = g.op("And", [causal, padding], "/model/mask/And")  # [B,1,S,T]
        self.mask = g.op("Where", [allowed, g.const(0.0, np.float32), g.const(MASK_VALUE, np.float32)], "/model/mask/Where")

    def rope(self, x: str, basename: str) -> str:
        g, hd = self.g, self.hd
        half = hd // 2
        x1 = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([-1])], f"{basename}/Slice_1")
        x2 = g.op("Slice", [x, g.const([half]), g.const([hd]), g.const([-1])], f"{basename}/Slice_2")
        rotated = g.op("Concat", [g.op("Neg", [x2], f"{basename}/Neg"), x1], f"{basename}/Concat", axis=-1)
        with_cos = g.op("Mul", [x, self.cos], f"{basename}/MulCos")
        return g.op("Add", [with_cos, g.op("Mul", [rotated, self.sin], f"{basename}/MulSin")], f"{basename}/Add")

    def repeat_kv(self, x: str, basename: str) -> str:
        g = self.g
        if self.n_rep == 1:
            return x
        shape = g.op("Shape", [x], f"{basename}/Shape")  # [B, nkv, T, hd]
        target = g.op(
            "Concat",
            [
                g.op("Slice", [shape, g.const([0]), g.const([2])], f"{basename}/Slice_BK"),
                g.const([self.n_rep]),
                g.op("Slice", [shape, g.const([2]), g.const([4])], f"{basename}/Slice_TD"),
            ],
            f"{basename}/TargetShape",
            axis=0,
        )
        expanded = g.op("Expand", [g.op("Unsqueeze", [x, g.const([2])], f"{basename}/Unsqueeze"), target], f"{basename}/Expand")
        return g.op("Reshape", [expanded, g.const([0, self.nh, -1, self.hd])], f"{basename}/Reshape")

    def heads(self, x: str, n_heads: int, basename: str) -> str:
        """``[B, S, n_heads * hd]`` -> ``[B, n_heads, S, hd]``."""
        g = self.g
        reshaped = g.op("Reshape", [x, g.const([0, 0, n_heads, self.hd])], f"{basename}/Reshape")
        return g.op("Transpose", [reshaped], f"{basename}/Transpose", perm=[0, 2, 1, 3])

    def present(self, i: int, kv: str, new: str, basename: str) -> str:
        """``present.i.kv`` = the past concatenated with this step's keys or values, a graph output."""
        out = f"present.{i}.{kv}"
        self.g.nodes.append(self.onnx.helper.make_node("Concat", [f"past_key_values.{i}.{kv}", new], [out], name=basename, axis=2))
        return out

    def attention(self, h: str, i: int) -> str:
        """Layer i's attention block with its residual."""
        g, B = self.g, f"/model/layers.{i}"
        x = self.rms_norm(h, f"model.layers.{i}.input_layernorm.weight", f"{B}/input_layernorm")
        q = self.layer_linear(x, i, "self_attn.q_proj", f"{B}/attn/q_proj")
        k = self.layer_linear(x, i, "self_attn.k_proj", f"{B}/attn/k_proj")
        v = self.layer_linear(x, i, "self_attn.v_proj", f"{B}/attn/v_proj")
        q = self.heads(q, self.nh, f"{B}/attn/q")
        k = self.heads(k, self.nkv, f"{B}/attn/k")
        v = self.heads(v, self.nkv, f"{B}/attn/v")
        q = self.rope(q, f"{B}/attn/q_rotary")
        k = self.rope(k, f"{B}/attn/k_rotary")
        present_k = self.present(i, "key", k, f"{B}/attn/k/ConcatPast")
        present_v = self.present(i, "value", v, f"{B}/attn/v/ConcatPast")
        for kv in (present_k, present_v):
            g.outputs.append(g.value(kv, self.TP.FLOAT, ["batch_size", self.nkv, "total_sequence_length", self.hd]))
        k_all = self.repeat_kv(present_k, f"{B}/attn/k/repeat_kv")
        v_all = self.repeat_kv(present_v, f"{B}/attn/v/repeat_kv")
        scores = g.op("MatMul", [q, g.op("Transpose", [k_all], f"{B}/attn/kT", perm=[0, 1, 3, 2])], f"{B}/attn/QK")
        scores = g.op("Add", [g.op("Mul", [scores, self.scale], f"{B}/attn/Scale"), self.mask], f"{B}/attn/Mask")
        probs = g.op("Softmax", [scores], f"{B}/attn/Softmax", axis=-1)
        ctx = g.op("MatMul", [probs, v_all], f"{B}/attn/PV")
        ctx = g.op(
            "Reshape",
            [g.op("Transpose", [ctx], f"{B}/attn/ctx/Transpose", perm=[0, 2, 1, 3]), g.const([0, 0, self.nh * self.hd])],
            f"{B}/attn/ctx/Reshape",
        )
        o = self.layer_linear(ctx, i, "self_attn.o_proj", f"{B}/attn/o_proj")
        return g.op("Add", [h, o], f"{B}/attn/Residual")

    def mlp(self, h: str, i: int) -> str:
        """Layer i's SwiGLU block with its residual."""
        g, B = self.g, f"/model/layers.{i}"
        x = self.rms_norm(h, f"model.layers.{i}.post_attention_layernorm.weight", f"{B}/post_attention_layernorm")
        gate = self.layer_linear(x, i, "mlp.gate_proj", f"{B}/mlp/gate_proj")
        up = self.layer_linear(x, i, "mlp.up_proj", f"{B}/mlp/up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{B}/mlp/act_fn/Sigmoid")], f"{B}/mlp/act_fn/Mul")
        down = self.layer_linear(g.op("Mul", [act, up], f"{B}/mlp/Mul"), i, "mlp.down_proj", f"{B}/mlp/down_proj")
        return g.op("Add", [h, down], f"{B}/mlp/Residual")

    def add_logits(self, h: str, emb_key: str) -> None:
        """The final norm and the LM head (tied: the embedding matrix itself, by Gemm transB)."""
        g, s, helper = self.g, self.s, self.onnx.helper
        x = self.rms_norm(h, "model.norm.weight", "/model/norm")
        if s.tie_word_embeddings:
            flat = g.op("Reshape", [x, g.const([-1, s.hidden_size])], "/lm_head/Flatten")
            logits2d = g.op("Gemm", [flat, emb_key], "/lm_head/Gemm", transB=1)
            shape = g.op("Shape", ["input_ids"], "/lm_head/Shape")
            out_shape = g.op("Concat", [shape, g.const([s.vocab_size])], "/lm_head/OutShape", axis=0)
            g.nodes.append(helper.make_node("Reshape", [logits2d, out_shape], ["logits"], name="/lm_head/Reshape"))
        else:
            y = self.lora_linear(x, "lm_head", "lm_head", "/lm_head")
            g.nodes.append(helper.make_node("Identity", [y], ["logits"], name="/lm_head/Identity"))
        g.outputs.insert(0, g.value("logits", self.TP.FLOAT, ["batch_size", "sequence_length", s.vocab_size]))


# The Hugging Face parameters the llama graph reads (LlamaForCausalLM's names): the graph's own
# vocabulary, so that the GGUF base can be read into it without transformers (onnx_base).
_LAYER_KEYS = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def llama_weight_keys(n_layers: int) -> list[str]:
    """The HF parameter names :func:`build_llama_graph` reads from its ``state`` (and ``lm_head.weight``, when untied)."""
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return keys + [f"model.layers.{i}.{k}.weight" for i in range(n_layers) for k in _LAYER_KEYS]


def build_llama_graph(
    state: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    name: str = "loramux-base",
    progress: Callable[[int, int], None] | None = None,
):
    """The ``onnx.ModelProto`` of a Llama model with LoRA inputs on every linear layer.

    ``state`` is a Hugging Face state dict of float arrays (``model.layers.0.self_attn.q_proj.weight``
    in ``(out, in)`` layout ...), ``config`` the LlamaConfig fields (:func:`hf_llama_config`).
    """
    parts = _LlamaGraph(state, config)
    g, helper = parts.g, parts.onnx.helper
    parts.add_inputs()
    emb_key = "model.embed_tokens.weight"
    g.init(emb_key, parts.weight(emb_key))
    h = g.op("Gather", [emb_key, "input_ids"], "/model/embed_tokens/Gather")
    parts.add_rotary()
    parts.add_mask()
    parts.scale = g.const(1.0 / math.sqrt(parts.hd), np.float32)  # the attention's 1/sqrt(head_dim)
    n_layers = parts.s.num_hidden_layers
    for i in range(n_layers):
        h = parts.mlp(parts.attention(h, i), i)
        if progress:
            progress(i + 1, n_layers)
    parts.add_logits(h, emb_key)
    graph = helper.make_graph(g.nodes, name, g.inputs, g.outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="loramux")
    model.ir_version = 8
    return model
