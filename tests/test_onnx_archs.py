"""ONNX adapters on every architecture onnxruntime-genai's model builder covers, against the builder itself.

The oracle: onnxruntime-genai's own model builder (``onnxruntime_genai.models.builder``, the
installed package) builds each tiny model of tests/tiny_arch.py with the random PEFT adapter
baked in (``--extra_options adapter_path=...``): its LoRA initializers are the names, layouts
and scales an onnxruntime-genai model expects. loramux's adapter parameters for the same PEFT
folder must be exactly those (same names, values within float32 rounding). Phi-3 is the case
where the layout is more than names: the builder unpacks ``qkv_proj`` and ``gate_up_proj``, A
shared, B split by rows. Negative control: the same comparison catches a 1.25x scale.

The builder drops embedding LoRA (a plain Gather), so loramux converts with ``skip_embeddings``.
Gemma 3 is not here: the builder fails on its transformers config in this environment
(``KeyError: 'rope_type'``), and loramux refuses ``--to onnx`` for it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "phi3"]


def _builder_lora(folder: Path, adapter: Path, out: Path) -> dict[str, np.ndarray]:
    """The LoRA initializers of the model the builder makes from ``folder`` with ``adapter`` baked in."""
    import onnx
    from onnx import numpy_helper

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(folder), "-i", str(folder), "-o", str(out)]
    cmd += ["-p", "fp32", "-e", "cpu", "-c", str(out / "cache"), "--extra_options", f"adapter_path={adapter}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the onnxruntime-genai builder failed on {folder.name}:\n{done.stderr[-3000:]}"
    model = onnx.load(str(out / "model.onnx"), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if ".lora_" in t.name}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path, dict[str, np.ndarray]]]:
    pytest.importorskip("onnx_ir", reason="onnxruntime-genai's builder needs onnx-ir (the dev extra)")
    pytest.importorskip("peft")
    from arch_reference import make_adapter
    from tiny_arch import ensure_built

    tmp = tmp_path_factory.mktemp("onnx-archs")
    out = {}
    for key, folder in ensure_built(ARCHS).items():
        adapter = make_adapter(folder, tmp / f"{key}-adapter", "rslora_patterns", seed=4)
        out[key] = (folder / "base-f32.gguf", adapter, _builder_lora(folder, adapter, tmp / f"{key}-onnx"))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_adapter_equals_the_builders_lora(arch, built):
    from loramux.converters.onnx_adapter import onnx_adapter_parameters

    base, adapter, theirs = built[arch]
    ours = onnx_adapter_parameters(adapter, base, skip_embeddings=True)
    assert len(theirs) >= 28 and set(ours) == set(theirs), f"{arch}: names differ: {sorted(set(ours) ^ set(theirs))[:4]}"
    for name, value in theirs.items():
        assert ours[name].shape == value.shape, f"{arch}: {name} {ours[name].shape} vs the builder's {value.shape}"
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-7, err_msg=f"{arch}: {name}")
    b_names = [n for n in theirs if ".lora_B." in n]
    wrong = {n: v * 1.25 if n in b_names else v for n, v in ours.items()}  # negative control
    assert any(not np.allclose(wrong[n], theirs[n], rtol=1e-5, atol=1e-7) for n in b_names)


def test_gemma3_onnx_is_refused_by_name(tmp_path):
    from arch_reference import make_adapter
    from tiny_arch import ensure_built

    from loramux.converters import UnsupportedAdapterError
    from loramux.converters.onnx_adapter import onnx_adapter_parameters

    folder = ensure_built(["gemma3"])["gemma3"]
    adapter = make_adapter(folder, tmp_path / "adapter", "plain", target_modules=["q_proj"])
    with pytest.raises(
        UnsupportedAdapterError, match=r"'gemma3': loramux's ONNX adapter layout is checked for \['gemma2', 'llama', 'phi3'"
    ):
        onnx_adapter_parameters(adapter, folder / "base-f32.gguf")
