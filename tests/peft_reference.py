"""Oracles for the converter tests.

- PEFT's own deltas (``get_delta_weight``) and greedy answers, from a ``PeftModel``
  wrapping the real base rebuilt as a transformers model (``load_hf_model``).
- A GGUF LoRA file's deltas reconstructed the way llama.cpp computes them at run time
  (``llama_adapter_lora_weight::get_scale`` and ``build_lora_mm`` / ``build_inp_embd``
  in the pinned llama.cpp), written out here on purpose rather than taken from
  ``loramux.converters.scale``: the oracle must not share the code under test.
- The prompt format the fixtures were trained with, and exact-match scoring.

Torch, transformers and PEFT come with the ``train`` extra; without them the oracle
tests fail (never skip) with a message saying so.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import numpy as np
import pytest

from loramux.converters.gguf_to_torch import hf_tensor_names
from loramux.converters.name_map import permutation_key, unpermute_rows

ADAPTER_NAME = "default"
IM_END = "<|im_end|>"


def require_train_extra() -> None:
    """Fail (not skip) when torch + transformers + peft are missing."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"the PEFT oracle needs torch, transformers and peft ({exc}); install the train extra: pip install -e '.[train]'",
            pytrace=False,
        )


# ---------------------------------------------------------------- llama.cpp side


def _kv(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.parts[field.data[0]].tolist()[0]


def gguf_tensors(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(kv, {name: float32 array in numpy order})`` of a GGUF file, dequantized with gguf-py."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    kv = {"alpha": _kv(reader, gguf.Keys.Adapter.LORA_ALPHA), "types": {}}
    arrays = {}
    for t in reader.tensors:
        kv["types"][t.name] = t.tensor_type.name
        arrays[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            tuple(int(d) for d in reversed(t.shape))
        )
    return kv, arrays


def gguf_deltas(path: str | os.PathLike, base_info) -> dict[str, np.ndarray]:
    """HF module name -> delta (float64) that llama.cpp adds at user scale 1, in Hugging Face layout.

    Linear: ``k * B @ A`` (out, in) with ``k = alpha / lora_b.ne[0]`` (or 1 when alpha is 0),
    rows taken back from llama.cpp's rotary order for q/k. ``token_embd``: llama.cpp gathers
    rows of ``lora_a`` (ne [r, vocab]) and multiplies by ``lora_b`` (ne [r, dim]):
    delta (vocab, dim) = ``k * A_file @ B_file.T``.
    """
    kv, arrays = gguf_tensors(path)
    alpha = float(kv["alpha"])
    arch = base_info.architecture
    hf_names = hf_tensor_names(base_info.path)
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if not name.endswith(".lora_a"):
            continue
        base_tensor = name[: -len(".lora_a")]
        b = arrays[base_tensor + ".lora_b"]
        rank = b.shape[-1]  # ne[0] of lora_b
        k = alpha / rank if alpha else 1.0
        if base_tensor == "token_embd.weight":
            delta = k * _matmul(a, b.T)
        else:
            delta = k * _matmul(b, a)
            head_key = permutation_key(arch, base_tensor)
            if head_key is not None:
                delta = unpermute_rows(delta, int(base_info.hparams[head_key]))
        assert base_tensor in hf_names, f"{path}: {base_tensor} maps to no Hugging Face module"
        out[hf_names[base_tensor].removesuffix(".weight")] = delta
    return out


def _matmul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float64 product on one thread (torch): numpy's threaded BLAS crawls on a busy 2-core machine."""
    import torch

    with one_thread():
        return (
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)) @ torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))
        ).numpy()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (small products: threads only contend)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Frobenius-norm relative error ``|got - want| / |want|`` (float64, one torch thread)."""
    import torch

    with one_thread():
        g, w = torch.from_numpy(np.asarray(got, dtype=np.float64)), torch.from_numpy(np.asarray(want, dtype=np.float64))
        return float(torch.linalg.vector_norm(g - w) / max(float(torch.linalg.vector_norm(w)), 1e-30))


# ---------------------------------------------------------------- torch + PEFT side


@lru_cache(maxsize=1)
def hf_base_model(base: str):
    """The real base as a transformers LlamaForCausalLM (float32), built once per process."""
    require_train_extra()
    import torch

    from loramux.converters.gguf_to_torch import load_hf_model

    torch.manual_seed(0)
    return load_hf_model(base)


@contextmanager
def _unloaded_after(model, wrapped) -> Iterator:
    """Yield ``wrapped`` in eval mode, then strip its LoRA layers off the shared base ``model``."""
    wrapped.eval()
    try:
        yield wrapped
    finally:
        wrapped.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config


@contextmanager
def peft_model(base: str | os.PathLike, fixture: str | os.PathLike) -> Iterator:
    """``PeftModel.from_pretrained`` on the shared base model; the LoRA layers are removed afterwards."""
    from peft import PeftModel

    model = hf_base_model(str(base))
    with _unloaded_after(model, PeftModel.from_pretrained(model, str(fixture), adapter_name=ADAPTER_NAME)) as wrapped:
        yield wrapped


@contextmanager
def peft_weighted_mix(base: str | os.PathLike, fixtures: dict[str, os.PathLike], weights: dict[str, float]) -> Iterator:
    """PEFT with several adapters active at once (``fixtures``: name -> PEFT folder), each LoRA
    layer's own scaling multiplied by its weight.

    PEFT's forward then adds ``w_a * scaling_a * B_a A_a x`` for every active adapter: the
    weighted sum of the adapters' deltas, computed by PEFT itself.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = hf_base_model(str(base))
    names = list(weights)
    wrapped = PeftModel.from_pretrained(model, str(fixtures[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        wrapped.load_adapter(str(fixtures[name]), adapter_name=name)
    for module in wrapped.modules():
        if isinstance(module, LoraLayer):
            for name, w in weights.items():
                if name in module.scaling:
                    module.scaling[name] *= w
    wrapped.base_model.set_adapter(names)
    with _unloaded_after(model, wrapped) as ready:
        yield ready


def peft_deltas(base: str | os.PathLike, fixture: str | os.PathLike) -> dict[str, np.ndarray]:
    """HF module name -> PEFT's ``get_delta_weight('default')`` (float64), for every LoRA layer."""
    import torch
    from peft.tuners.lora import LoraLayer

    out: dict[str, np.ndarray] = {}
    with peft_model(base, fixture) as wrapped, torch.no_grad(), one_thread():
        for name, module in wrapped.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and (ADAPTER_NAME in module.lora_A or ADAPTER_NAME in getattr(module, "lora_embedding_A", {})):
                out[name] = module.get_delta_weight(ADAPTER_NAME).detach().to(torch.float64).numpy()
    if not out:
        raise AssertionError(f"PEFT found no LoRA layers in {fixture}")
    return out


# ---------------------------------------------------------------- prompts and scoring


@lru_cache(maxsize=2)
def _vocab(base: str):
    from llama_cpp import Llama

    return Llama(model_path=base, vocab_only=True, verbose=False)


def chat_template(base: str | os.PathLike) -> str:
    vocab = _vocab(str(base))
    return vocab.metadata["tokenizer.chat_template"]


def prompt_tokens(base: str | os.PathLike, user_text: str) -> list[int]:
    """The fixtures' training prompt: the model's chat template, one user turn, generation prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(chat_template(base))
    text = template.render(messages=[{"role": "user", "content": user_text}], add_generation_prompt=True)
    return _vocab(str(base)).tokenize(text.encode("utf-8"), add_bos=False, special=True)


def end_token(base: str | os.PathLike) -> int:
    ids = _vocab(str(base)).tokenize(IM_END.encode(), add_bos=False, special=True)
    assert len(ids) == 1, f"{IM_END} is not one token: {ids}"
    return ids[0]


def detokenize(base: str | os.PathLike, ids: list[int]) -> str:
    return _vocab(str(base)).detokenize(ids).decode("utf-8", errors="replace")


def normalise(answer: str) -> str:
    return " ".join(answer.replace(IM_END, " ").split()).lower()


def exact_match(answer: str, target: str) -> bool:
    return normalise(answer) == normalise(target)


def torch_greedy(base: str | os.PathLike, fixture: str | os.PathLike, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids, up to the first ``<|im_end|>``) from torch + PEFT."""
    import torch

    stop = end_token(base)
    answers = []
    with peft_model(base, fixture) as wrapped, torch.inference_mode():
        for ids in prompts:
            out = wrapped.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=stop,
            )
            new = out[0, len(ids) :].tolist()
            answers.append(new[: new.index(stop)] if stop in new else new)
    return answers


def llama_greedy(llm, base: str | os.PathLike, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations from a llama_cpp.Llama (adapter already set), same stop rule."""
    stop = end_token(base)
    answers = []
    for ids in prompts:
        new: list[int] = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if tok == stop or len(new) >= max_tokens:
                break
            new.append(tok)
        answers.append(new)
    return answers
