"""Write a router as one ONNX file (opset 17, dynamic batch and sequence length), metadata included.

The graph is built node by node with ``onnx.helper`` from the folded weights
(:class:`loramux.router.model.FoldedRouter`); it needs ``onnx`` (the ``onnx`` extra), not torch.

Inputs:  ``input_ids`` int64 ``(batch, sequence)``, ``attention_mask`` int64 ``(batch, sequence)`` (1 = token, 0 = padding)
Output:  ``logits`` float32 ``(batch, n_outcomes)``

    rows    = Gather(table, input_ids)                      (batch, sequence, hidden)
    summed  = MatMul(Unsqueeze(mask, 1), rows)              (batch, 1, hidden): masked sum, one batched matmul
    pooled  = Squeeze(summed, 1) / max(sum(mask), 1)        (batch, hidden)
    logits  = Gemm(Relu(pooled + b1), W2^T) + b2            (batch, n_outcomes)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from loramux.converters.atomic import atomic_output
from loramux.router.errors import RouterError
from loramux.router.metadata import ATTENTION_MASK, INPUT_IDS, METADATA_KEY, OUTPUT_LOGITS, RouterMetadata
from loramux.router.model import FoldedRouter

OPSET = 17


def build_onnx_model(folded: FoldedRouter, metadata: RouterMetadata):
    """The router as an in-memory ``onnx.ModelProto`` (checked with ``onnx.checker``)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RouterError(f"exporting a router needs the onnx package: pip install 'loramux[onnx]' ({exc})") from exc

    if folded.n_outcomes != metadata.n_outcomes:
        raise RouterError(f"router has {folded.n_outcomes} outputs but its metadata names {metadata.n_outcomes} outcomes")

    def init(name: str, array: np.ndarray):
        return numpy_helper.from_array(np.ascontiguousarray(array), name)

    initializers = [
        init("token_table", folded.table.astype(np.float32)),
        init("bias1", folded.bias1.astype(np.float32)),
        init("weight2", folded.weight2.astype(np.float32)),
        init("bias2", folded.bias2.astype(np.float32)),
        init("axis1", np.array([1], dtype=np.int64)),
        init("one", np.array(1.0, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("Gather", ["token_table", INPUT_IDS], ["rows"], axis=0),
        helper.make_node("Cast", [ATTENTION_MASK], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis1"], ["mask_row"]),
        helper.make_node("MatMul", ["mask_row", "rows"], ["summed3"]),
        helper.make_node("Squeeze", ["summed3", "axis1"], ["summed"]),
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["pooled"]),
        helper.make_node("Add", ["pooled", "bias1"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "weight2", "bias2"], [OUTPUT_LOGITS], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "loramux_router",
        inputs=[
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "sequence"]),
        ],
        outputs=[helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["batch", metadata.n_outcomes])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="loramux",
        doc_string=(
            "loramux router: masked mean of base-model token embeddings (folded with the first layer), "
            f"ReLU MLP; logits over {len(metadata.adapters)} adapters"
            + (" and 'none of these'" if metadata.none_outcome else "")
            + f". Metadata key {METADATA_KEY!r} holds adapters, base fingerprint, feature recipe and selection defaults."
        ),
    )
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime releases older than this onnx package
    helper.set_model_props(model, {METADATA_KEY: metadata.dumps()})
    onnx.checker.check_model(model, full_check=True)
    return model


def export_router(folded: FoldedRouter, metadata: RouterMetadata, path: str | os.PathLike) -> Path:
    """Write the router ONNX file atomically (no partial file on failure); return its path."""
    model = build_onnx_model(folded, metadata)
    data = model.SerializeToString()
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


__all__ = ["OPSET", "build_onnx_model", "export_router"]
