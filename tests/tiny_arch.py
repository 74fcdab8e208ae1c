"""Tiny random-weight base models of every architecture loramux converts for, made here (no hub).

Each model is a ``transformers`` config with a few layers, a small hidden size and GQA, with
random weights (fixed seed), saved with ``save_pretrained``, then made into an f32 base GGUF by
llama.cpp's own ``convert_hf_to_gguf.py`` from the pinned llama-cpp-python sdist (the same
sources the native library is built from). The tokenizer is a tiny sentencepiece model trained
here on BBH text (the converter wants ``tokenizer.model`` for Gemma and Phi-3, and takes it for
the others too).

Built once and cached under ``loramux.base_model.cache_dir() / "tiny-archs"``, keyed by the spec,
the library versions and the converter's sources; a session builds every missing model in one
process (``python tests/tiny_arch.py build ROOT ARCH...``), so torch is imported once.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEED = 1234
# a chat template in the GGUF (tokenizer.chat_template), so that run, chat and eval work on the tiny models
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# q/k weights x this at build: attention far from uniform, so a q/k layout error moves the logits
QK_GAIN = 8.0
VOCAB = 512
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class TinySpec:
    """One tiny model: the transformers classes, config fields, and the GGUF architecture it becomes."""

    key: str  # our name for it (an architecture may appear as several families, e.g. llama and mistral)
    gguf_arch: str
    config_class: str
    model_class: str
    fields: dict[str, Any] = field(default_factory=dict)

    def config_fields(self) -> dict[str, Any]:
        return {**_COMMON, **self.fields}


SPECS: dict[str, TinySpec] = {
    s.key: s
    for s in [
        TinySpec("llama", "llama", "LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
        TinySpec("mistral", "llama", "MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": None}),
        TinySpec("qwen2", "qwen2", "Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
        TinySpec("qwen3", "qwen3", "Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": False, "head_dim": 16}),
        TinySpec(
            "gemma2",
            "gemma2",
            "Gemma2Config",
            "Gemma2ForCausalLM",
            {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64, "hidden_activation": "gelu_pytorch_tanh"},
        ),
        TinySpec(
            "gemma3",
            "gemma3",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
        ),
        TinySpec("phi3", "phi3", "Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False, "original_max_position_embeddings": 256}),
        # Mixture of experts: Mixtral becomes a llama GGUF with stacked experts (ffn_*_exps). The
        # pinned converter wants a known BPE tokenizer for qwen2moe/qwen3moe, which no hub-less test has.
        TinySpec(
            "mixtral",
            "llama",
            "MixtralConfig",
            "MixtralForCausalLM",
            {"tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
        ),
    ]
}


def cache_root() -> Path:
    from loramux.base_model import cache_dir

    return cache_dir() / "tiny-archs"


def _versions_key() -> str:
    import transformers

    from upstream_converter import SDIST_VERSION

    return f"transformers={transformers.__version__};llama-cpp-python={SDIST_VERSION};seed={SEED};qk={QK_GAIN};chat=1"


def model_dir(spec: TinySpec) -> Path:
    text = json.dumps([spec.config_class, spec.model_class, spec.config_fields(), _versions_key()], sort_keys=True)
    return cache_root() / f"{spec.key}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def gguf_path(spec: TinySpec) -> Path:
    return model_dir(spec) / "base-f32.gguf"


def ensure_built(keys: list[str]) -> dict[str, Path]:
    """The folder (HF model + ``base-f32.gguf``) of each tiny model, building the missing ones in one process."""
    missing = [k for k in keys if not gguf_path(SPECS[k]).is_file()]
    if missing:
        from upstream_converter import upstream_env

        env = upstream_env(single_thread=False)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"], *sys.path[1:]])
        proc = subprocess.run(
            [sys.executable, str(Path(__file__)), "build", *missing], env=env, capture_output=True, text=True, timeout=1800
        )
        if proc.returncode != 0:
            raise RuntimeError(f"building tiny models {missing} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {k: model_dir(SPECS[k]) for k in keys}


# ------------------------------------------------------------------ the builder (subprocess) --
def _tokenizer_model(folder: Path) -> Path:
    """A sentencepiece model of VOCAB pieces (byte fallback), trained once on BBH inputs."""
    out = cache_root() / f"spm-{VOCAB}.model"
    if out.is_file():
        return out
    import sentencepiece as spm

    data = HERE.parents[1] / "shared" / "data" / "bbh" / "train.jsonl"
    lines = [json.loads(line)["input"] for line in data.read_text().splitlines()[:2000]]
    text = folder / "corpus.txt"
    text.write_text("\n".join(lines))
    prefix = folder / "spm"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.99,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(f"{prefix}.model", out)
    return out


def _build_one(spec: TinySpec, script: Path) -> None:
    import shutil
    import tempfile

    import torch
    import transformers

    folder = model_dir(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{spec.key}-", dir=folder.parent) as tmp:
        staging = Path(tmp) / "model"
        torch.manual_seed(SEED)
        config = getattr(transformers, spec.config_class)(**spec.config_fields())
        model = getattr(transformers, spec.model_class)(config).to(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):  # norms away from 1 (Gemma's 1 + w): a wrong shift would show
                    p.add_(torch.rand_like(p) * 0.2)
                if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                    p.mul_(QK_GAIN)
        model.save_pretrained(staging)
        shutil.copy(_tokenizer_model(Path(tmp)), staging / "tokenizer.model")
        (staging / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "chat_template": CHAT_TEMPLATE}))
        argv = sys.argv
        sys.argv = [str(script), str(staging), "--outtype", "f32", "--outfile", str(staging / "base-f32.gguf")]
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exc:  # the script may end with sys.exit()
            if exc.code not in (None, 0):
                raise
        finally:
            sys.argv = argv
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)


def main(argv: list[str]) -> None:
    from upstream_converter import upstream_dir

    script = upstream_dir() / "convert_hf_to_gguf.py"
    for key in argv:
        _build_one(SPECS[key], script)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "build":
        raise SystemExit("usage: tiny_arch.py build KEY...")
    main(sys.argv[2:])
