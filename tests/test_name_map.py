"""converters/name_map.py's tables agree with gguf-py's own TensorNameMap (the names llama.cpp's
HF converter writes), for every module, every block and every architecture loramux supports."""

from __future__ import annotations

import gguf
import pytest

from loramux.converters.name_map import ARCH_TABLES, gguf_tensor_name, hf_module_for_tensor

N_BLOCKS = 32


def _gguf_py_name(arch: str, hf_module: str) -> str | None:
    model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name = gguf.get_tensor_name_map(model_arch, N_BLOCKS).get_name(hf_module)
    return f"{name}.weight" if name else None


@pytest.mark.parametrize("arch", sorted(ARCH_TABLES))
def test_every_module_maps_to_the_name_gguf_py_gives(arch):
    compared = 0
    for template in ARCH_TABLES[arch].modules:
        blocks = range(N_BLOCKS) if "{bid}" in template else [None]
        for bid in blocks:
            module = template.format(bid=bid) if bid is not None else template
            ours = gguf_tensor_name(arch, module)
            assert ours == _gguf_py_name(arch, module), f"{arch}: {module} -> {ours}, gguf-py says {_gguf_py_name(arch, module)}"
            assert hf_module_for_tensor(arch, ours) == module
            compared += 1
    assert compared >= 9 * N_BLOCKS


def test_a_module_gguf_py_does_not_know_has_no_name_here_either():
    assert gguf_tensor_name("llama", "model.layers.3.self_attn.rotary_emb") is None
    assert _gguf_py_name("llama", "model.layers.3.self_attn.rotary_emb") is None
