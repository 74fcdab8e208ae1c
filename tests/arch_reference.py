"""torch + PEFT side of the architecture tests: random PEFT adapters on the tiny models, and their logits.

Shared by tests/test_architectures.py (the convert oracle) and benchmarks/convert.py (adapters to
time). Needs the ``train`` extra (torch, transformers, peft).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tiny_arch import SEED, SPECS, VOCAB

# PEFT configs of the random adapters (init_lora_weights=False: random A and B)
ADAPTER_KINDS: dict[str, dict[str, Any]] = {
    # every linear module (and the input embedding where the head is not tied), r=4, alpha/r
    "plain": {"r": 4, "lora_alpha": 8},
    # rsLoRA with mixed ranks and alphas: o_proj r=2 (rank_pattern), down_proj alpha 32 (alpha_pattern)
    "rslora_patterns": {"r": 8, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"down_proj": 32}},
}


# each module's delta, as a fraction of its base weight's norm (a fine-tune moves weights by a fraction)
DELTA_RATIO = 0.3


def load_hf(folder: Path):
    """The tiny model as saved (float32, eval mode)."""
    import torch
    import transformers

    spec = next(s for s in SPECS.values() if folder.name.startswith(s.key + "-"))
    model = getattr(transformers, spec.model_class).from_pretrained(folder, torch_dtype=torch.float32)
    return model.eval()


def linear_targets(model) -> list[str]:
    """Suffixes of the model's nn.Linear modules (not the output head): PEFT's all-linear, by name."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    return sorted(names)


def make_adapter(folder: Path, out: Path, kind: str, *, seed: int = SEED, **overrides: Any) -> Path:
    """A random PEFT LoRA of ``kind`` on the tiny model in ``folder``, saved with save_pretrained to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_hf(folder)
    targets = linear_targets(model)
    if not model.config.tie_word_embeddings:
        targets.append("embed_tokens")
    config = {"target_modules": targets, "init_lora_weights": False, **ADAPTER_KINDS[kind], **overrides}
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**config))
    _condition(peft_model)
    peft_model.save_pretrained(out, save_embedding_layers=False)  # only the LoRA matrices
    return out


def _condition(peft_model, ratio: float = DELTA_RATIO) -> None:
    """Scale each module's B so that ||scaling * B A|| = ratio * ||W||, as a trained adapter's delta is.

    With PEFT's random init (``init_lora_weights=False``) an embedding delta is ~100x the embedding
    itself and drowns every other module behind the first RMSNorm: the oracle would then miss a
    wrong q/k layout. Conditioned, every module moves the logits.
    """
    import torch

    with torch.no_grad():
        for module in peft_model.modules():
            if not hasattr(getattr(module, "base_layer", None), "weight") or not hasattr(module, "scaling"):
                continue
            for name, scaling in module.scaling.items():
                if name in getattr(module, "lora_A", {}):
                    a, b = module.lora_A[name].weight, module.lora_B[name].weight
                elif name in getattr(module, "lora_embedding_A", {}):
                    a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
                else:
                    continue
                delta = torch.linalg.matrix_norm(scaling * (b @ a))
                b.mul_(ratio * torch.linalg.matrix_norm(module.base_layer.weight) / delta)


def torch_logits(folder: Path, tokens: list[int], adapter: Path | None = None) -> np.ndarray:
    """Logits (n_tokens, vocab) of the tiny model in torch, with the PEFT adapter when given."""
    import torch

    model = load_hf(folder)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]))
    return out.logits[0].double().numpy()


def probe_tokens(n: int = 16, seed: int = 7) -> list[int]:
    """A fixed token sequence inside the tiny vocabulary (no special tokens)."""
    return [int(t) for t in np.random.default_rng(seed).integers(4, VOCAB, size=n)]
