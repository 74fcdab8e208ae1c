"""loramux.converters: PEFT LoRA checkpoints -> GGUF (llama.cpp) and onnxruntime adapters, exactly.

The scale convention and tensor layouts are documented once, in :mod:`loramux.converters.scale`.
"""

from .base_gguf import BaseModelInfo, read_base_model
from .errors import AdapterError, BaseModelError, BaseModelMismatchError, LoramuxError, UnsupportedAdapterError
from .gguf_adapter import OUT_TYPES, convert_peft_to_gguf
from .onnx_adapter import convert_peft_to_onnx_adapter, read_onnx_adapter, write_onnx_adapter
from .onnx_mix import mix_onnx_parameters, mix_peft_to_onnx_parameters, write_onnx_mix
from .peft_checkpoint import LoraModule, PeftAdapter, load_peft_adapter

__all__ = [
    "AdapterError",
    "BaseModelError",
    "BaseModelInfo",
    "BaseModelMismatchError",
    "LoraModule",
    "LoramuxError",
    "OUT_TYPES",
    "PeftAdapter",
    "UnsupportedAdapterError",
    "convert_peft_to_gguf",
    "convert_peft_to_onnx_adapter",
    "mix_onnx_parameters",
    "mix_peft_to_onnx_parameters",
    "read_onnx_adapter",
    "write_onnx_adapter",
    "write_onnx_mix",
    "load_peft_adapter",
    "read_base_model",
]
