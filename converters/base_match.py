"""Match one PEFT module against the base tensor it adapts: name lookup and shape checks.

Shared by every output format (GGUF, onnxruntime), so a misfit adapter gets the same
refusal whatever it is converted to.
"""

from __future__ import annotations

from .base_gguf import BaseModelInfo
from .errors import BaseModelMismatchError, UnsupportedAdapterError
from .name_map import gguf_tensor_name, refusal
from .peft_checkpoint import LoraModule


def locate_base_tensor(module: LoraModule, base: BaseModelInfo) -> tuple[str, tuple[int, ...]]:
    """The GGUF base tensor ``module`` adapts and its ggml shape; raise if the base has none."""
    why = refusal(base.architecture, module.name)
    if why is not None:
        raise UnsupportedAdapterError(f"module {module.name!r} {why}")
    tensor = gguf_tensor_name(base.architecture, module.name)
    if tensor is None:
        raise BaseModelMismatchError(
            f"module {module.name!r} has no counterpart in a {base.architecture!r} GGUF; "
            "the adapter targets a module llama.cpp does not adapt or was built for another architecture"
        )
    shape = base.tensor_shapes.get(tensor)
    if shape is None:
        hint = " (the base ties its output projection to token_embd)" if tensor == "output.weight" else ""
        raise BaseModelMismatchError(
            f"module {module.name!r} adapts {tensor!r}, which the base model {base.path.name} does not have{hint}: "
            "was the adapter trained on another model?"
        )
    return tensor, shape


def check_module_fits(module: LoraModule, tensor: str, shape: tuple[int, ...]) -> None:
    """Raise unless A/B fit the base tensor (linear: ne = [in, out]; embedding: ne = [dim, vocab])."""
    if module.kind == "embedding":
        dim, vocab = shape
        if module.A.shape[1] != vocab or module.B.shape[0] != dim:
            raise BaseModelMismatchError(
                f"embedding LoRA {module.name!r} is for vocab {module.A.shape[1]} x dim {module.B.shape[0]}, "
                f"but {tensor!r} in the base is vocab {vocab} x dim {dim}: was the adapter trained on another model?"
            )
        return
    n_in, n_out = shape
    if module.A.shape[1] != n_in or module.B.shape[0] != n_out:
        raise BaseModelMismatchError(
            f"module {module.name!r} maps {module.A.shape[1]} -> {module.B.shape[0]} features, but {tensor!r} in the base "
            f"maps {n_in} -> {n_out}: was the adapter trained on another model?"
        )
