"""Every architecture loramux converts for, exact against torch + PEFT on tiny random-weight models.

The models (tests/tiny_arch.py) are built here from ``transformers`` configs and made into f32
base GGUFs by llama.cpp's own ``convert_hf_to_gguf.py`` from the pinned sources; the adapters are
random PEFT LoRAs (``init_lora_weights=False``) on every linear module, with rsLoRA and rank/alpha
patterns (tests/arch_reference.py). No hub, no mocks.

The oracle: the adapter's effect on the logits, ``E = logits(adapter) - logits(base)`` over 16
positions, computed by torch + PEFT and by llama.cpp with the GGUF loramux writes; the relative
error ``||E_cpp - E_torch|| / ||E_torch||`` stays below ``ARCH_EFFECT_REL_TOL`` (tests/floors.py).
Negative controls that the oracle must catch: a wrong scale, A and B swapped, and the row
permutation toggled (skipped on llama, applied where the architecture has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_adapter_variant
from floors import ARCH_BASE_LOGIT_ATOL, ARCH_EFFECT_REL_TOL
from peft_reference import require_train_extra

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral"]
KINDS = ["plain", "rslora_patterns"]
CONTROL_FACTOR = 10  # each negative control must miss by 10x the tolerance


def _cpp_logits(base: Path, tokens: list[int], lora: Path | None = None) -> np.ndarray:
    """Logits of every position, llama.cpp through llama-cpp-python (one thread)."""
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(base), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False, **kwargs)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


class ArchCases:
    """Per architecture, computed once: the tiny model, its adapters, their GGUFs and both sides' logits."""

    def __init__(self, folders: dict[str, Path], tmp: Path) -> None:
        self.folders, self.tmp, self._done = folders, tmp, {}
        from arch_reference import probe_tokens

        self.tokens = probe_tokens()

    def base(self, arch: str) -> Path:
        return self.folders[arch] / "base-f32.gguf"

    def get(self, arch: str) -> dict:
        if arch not in self._done:
            self._done[arch] = self._compute(arch)
        return self._done[arch]

    def _compute(self, arch: str) -> dict:
        from arch_reference import make_adapter, torch_logits

        from loramux.converters import convert_peft_to_gguf

        folder, base = self.folders[arch], self.base(arch)
        case = {"torch_base": torch_logits(folder, self.tokens), "cpp_base": _cpp_logits(base, self.tokens)}
        for kind in KINDS:
            peft_dir = make_adapter(folder, self.tmp / f"{arch}-{kind}", kind)
            gguf_file = convert_peft_to_gguf(peft_dir, base, self.tmp / f"{arch}-{kind}.gguf", outtype="f32")
            case[kind] = {
                "peft": peft_dir,
                "gguf": gguf_file,
                "torch": torch_logits(folder, self.tokens, peft_dir) - case["torch_base"],
                "cpp": _cpp_logits(base, self.tokens, gguf_file) - case["cpp_base"],
            }
        return case

    def effect_error(self, arch: str, kind: str, gguf_file: Path | None = None) -> float:
        case = self.get(arch)
        cpp = case[kind]["cpp"] if gguf_file is None else _cpp_logits(self.base(arch), self.tokens, gguf_file) - case["cpp_base"]
        return _rel(cpp, case[kind]["torch"])


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> ArchCases:
    require_train_extra()
    from tiny_arch import ensure_built

    return ArchCases(ensure_built(ARCHS), tmp_path_factory.mktemp("archs"))


@pytest.mark.parametrize("arch", ARCHS)
def test_base_gguf_agrees_with_transformers(cases, arch):
    """The precondition of the oracle: llama.cpp runs the base GGUF as transformers runs the HF model."""
    case = cases.get(arch)
    diff = float(np.abs(case["cpp_base"] - case["torch_base"]).max())
    print(f"{arch}: base max |logit diff| {diff:.2e}")
    assert diff < ARCH_BASE_LOGIT_ATOL, f"{arch}: base logits differ by {diff:.3g}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_converted_adapter_matches_peft(cases, arch, kind):
    case = cases.get(arch)[kind]
    assert np.sqrt(np.mean(case["torch"] ** 2)) > 0.05, f"{arch} {kind}: the adapter barely changes the logits; the oracle could not fail"
    err = cases.effect_error(arch, kind)
    print(f"{arch} {kind}: relative error of the adapter effect {err:.2e}")
    assert err < ARCH_EFFECT_REL_TOL, f"{arch} {kind}: llama.cpp's adapter effect differs from PEFT's by {err:.3g}"


def _controls(arch: str, base: Path) -> dict:
    """Edits of a GGUF adapter's ``{tensor: (lora_a, lora_b)}`` that a correct oracle must catch."""
    from loramux.converters.base_gguf import read_base_model
    from loramux.converters.name_map import permute_rows, unpermute_rows

    hp = read_base_model(base).hparams
    heads = {"attn_q": hp[f"{read_base_model(base).architecture}.attention.head_count"]}
    heads["attn_k"] = hp.get(f"{read_base_model(base).architecture}.attention.head_count_kv", heads["attn_q"])
    heads["attn_qkv"] = heads["attn_q"]
    toggle = unpermute_rows if arch in ("llama", "mistral", "mixtral") else permute_rows

    def wrong_scale(modules):
        for name, (a, b) in modules.items():
            modules[name] = (a, b * 1.25)

    def swapped(modules):
        for name, (a, b) in modules.items():
            if name.endswith("attn_output.weight") and a.shape[1] == b.shape[0]:
                modules[name] = (np.ascontiguousarray(b.T), np.ascontiguousarray(a.T))

    def permutation(modules):
        for name, (a, b) in modules.items():
            kind = name.split(".")[-2]
            if kind in heads:
                modules[name] = (a, np.ascontiguousarray(toggle(b, int(heads[kind]))))

    return {"wrong scale x1.25": wrong_scale, "A/B swapped on attn_output": swapped, "row permutation toggled": permutation}


@pytest.mark.parametrize("arch", ARCHS)
def test_negative_controls_fail_the_oracle(cases, arch, tmp_path):
    base = cases.base(arch)
    src = cases.get(arch)["plain"]["gguf"]
    for label, edit in _controls(arch, base).items():
        variant = write_adapter_variant(src, tmp_path / f"{label.split()[0]}.gguf", edit, base=base)
        err = cases.effect_error(arch, "plain", variant)
        print(f"{arch}: control '{label}': {err:.3f}")
        assert err > CONTROL_FACTOR * ARCH_EFFECT_REL_TOL, f"{arch}: the oracle misses the control '{label}' (error {err:.3g})"


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mixtral"])
def test_gguf_to_torch_rebuilds_each_base(cases, arch):
    """The torch rebuild used by the oracles and the ONNX export: the same logits as the HF model."""
    import torch

    from loramux.converters.gguf_to_torch import load_hf_model

    model = load_hf_model(cases.base(arch))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([cases.tokens])).logits[0].double().numpy()
    assert np.abs(logits - cases.get(arch)["torch_base"]).max() < 1e-5


def test_gguf_to_torch_refuses_a_mixture_of_experts_base(cases):
    from loramux.converters import UnsupportedAdapterError
    from loramux.converters.gguf_to_torch import load_hf_model

    with pytest.raises(UnsupportedAdapterError, match="mixture-of-experts"):
        load_hf_model(cases.base("mixtral"))


@pytest.mark.parametrize("arch", ARCHS)
def test_upstream_converter_writes_the_same_tensors(cases, arch):
    """llama.cpp's own convert_lora_to_gguf.py, given the HF folder, agrees tensor for tensor (plain LoRA: no fold)."""
    import gguf

    from upstream_converter import converted_by_upstream

    case = cases.get(arch)["plain"]
    theirs = converted_by_upstream(cases.base(arch), {arch: case["peft"]}, hf_dir=cases.folders[arch])[arch]
    read = lambda p: {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(p).tensors}  # noqa: E731
    ours, up = read(case["gguf"]), read(theirs)
    assert set(ours) == set(up), f"{arch}: tensors differ: {sorted(set(ours) ^ set(up))[:4]}"
    for name, data in ours.items():
        assert np.array_equal(data, up[name].reshape(data.shape)), f"{arch}: {name} differs from upstream"


def _refused(peft_dir: Path, base: Path, tmp: Path, match: str) -> None:
    from loramux.converters import AdapterError, convert_peft_to_gguf

    out = tmp / "refused.gguf"
    with pytest.raises(AdapterError, match=match):
        convert_peft_to_gguf(peft_dir, base, out)
    assert not out.exists()


def test_dora_is_refused(cases, tmp_path):
    from arch_reference import make_adapter

    peft_dir = make_adapter(cases.folders["qwen2"], tmp_path / "dora", "plain", use_dora=True, target_modules=["q_proj", "v_proj"])
    _refused(peft_dir, cases.base("qwen2"), tmp_path, "DoRA")


def test_expert_lora_is_refused_by_module_and_attention_lora_converts(cases, tmp_path):
    from arch_reference import make_adapter

    peft_dir = make_adapter(
        cases.folders["mixtral"], tmp_path / "experts", "plain", target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]
    )
    _refused(peft_dir, cases.base("mixtral"), tmp_path, "target_parameters .* no per-expert LoRA")
    # the same tensors without the config key (as older PEFT wrote per-expert modules): refused by module name
    config_file = peft_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_parameters"] = None
    config["rank_pattern"] = {"experts": 4 * config["r"]}  # PEFT stacks one rank-r pair per expert (4 experts)
    config_file.write_text(json.dumps(config))
    _refused(peft_dir, cases.base("mixtral"), tmp_path, r"model\.layers\.0\.mlp\.experts' is a mixture-of-experts expert weight")
    assert cases.effect_error("mixtral", "plain") < ARCH_EFFECT_REL_TOL  # q/k/v/o of the same base: exact


@pytest.mark.parametrize("arch,module", [("gemma2", "embed_tokens"), ("gemma3", "embed_tokens"), ("gemma3", "lm_head")])
def test_tied_gemma_refuses_embedding_and_head_lora(cases, tmp_path, arch, module):
    from arch_reference import make_adapter

    peft_dir = make_adapter(cases.folders[arch], tmp_path / module, "plain", target_modules=["q_proj", module])
    _refused(peft_dir, cases.base(arch), tmp_path, "ties its output projection" if module == "embed_tokens" else "output.weight")


def test_the_adapters_exercise_what_they_claim(cases):
    """rsLoRA + rank/alpha patterns reach the file: per-module ranks differ, and alpha stays the config's."""
    import gguf

    reader = gguf.GGUFReader(cases.get("qwen3")["rslora_patterns"]["gguf"])
    ranks = {t.name.split(".")[-3]: int(t.shape[-1]) for t in reader.tensors if t.name.endswith(".lora_a")}
    assert ranks["attn_output"] == 2 and ranks["attn_q"] == 8
    config = json.loads((cases.get("qwen3")["rslora_patterns"]["peft"] / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["alpha_pattern"] == {"down_proj": 32}
