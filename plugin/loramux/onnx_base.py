"""The base model as an ONNX model with LoRA inputs, built once and cached, and run with onnxruntime.

``onnx_base_model()`` rebuilds the base GGUF (dequantized, float32) as an ONNX graph whose
every linear layer has LoRA graph inputs with empty defaults (:mod:`loramux.converters.onnx_graph`),
and caches it under ``cache_dir()/onnx/<base fingerprint>-g<graph version>/model.onnx``, with a
``genai_config.json`` beside it so that the folder also loads as an onnxruntime-genai model
(``og.Model(folder)``, ``og.Adapters``, ``Generator.set_active_adapter``).
:class:`OnnxLoraModel` runs it with onnxruntime, with no adapter, an onnxruntime adapter
file or ``LoraAdapter`` (``RunOptions.add_active_adapter``), or a dict of LoRA parameters
fed as inputs (an in-memory mix per request, see :mod:`loramux.converters.onnx_mix`).

Needs the ``onnx`` extra (onnx, onnxruntime) to build and run, and the GGUF reader that is
part of the default install; no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from loramux.base_model import cache_dir, default_base_model
from loramux.converters import onnx_deps
from loramux.converters.atomic import atomic_output
from loramux.converters.base_gguf import read_base_model
from loramux.converters.errors import AdapterError
from loramux.converters.gguf_to_torch import hf_llama_config, hf_state_dict
from loramux.converters.onnx_adapter import read_onnx_adapter
from loramux.converters.onnx_graph import build_llama_graph, llama_weight_keys

# Bump when the graph layout changes, so cached models are rebuilt.
GRAPH_VERSION = 1

AdapterLike = Union[None, str, os.PathLike, Mapping[str, np.ndarray], Any]


def onnx_base_path(base: str | os.PathLike | None = None) -> Path:
    """Where the ONNX model for ``base`` (default: the embedded base GGUF) is cached."""
    info = read_base_model(base or default_base_model())
    return cache_dir() / "onnx" / f"{info.fingerprint}-g{GRAPH_VERSION}" / "model.onnx"


GENAI_CONFIG = "genai_config.json"


def _special_token(base: str | os.PathLike, key: str, default: int) -> int:
    import gguf

    field = gguf.GGUFReader(base, "r").fields.get(key)
    return int(field.parts[field.data[0]][0]) if field is not None else default


def genai_config(base: str | os.PathLike, model_file: str = "model.onnx") -> dict[str, Any]:
    """An onnxruntime-genai ``genai_config.json`` for the ONNX base model of ``base``.

    The keys are those onnxruntime-genai's model builder writes (``make_genai_config``) for a
    decoder with ``input_ids``/``attention_mask``/``position_ids`` and a separate past/present
    KV cache; search defaults to greedy.
    """
    c = hf_llama_config(base)
    eos = _special_token(base, "tokenizer.ggml.eos_token_id", 2)
    return {
        "model": {
            "bos_token_id": _special_token(base, "tokenizer.ggml.bos_token_id", 1),
            "context_length": c["max_position_embeddings"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [], "log_severity_level": 3},
                "filename": model_file,
                "head_size": c["hidden_size"] // c["num_attention_heads"],
                "hidden_size": c["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": c["num_attention_heads"],
                "num_hidden_layers": c["num_hidden_layers"],
                "num_key_value_heads": c["num_key_value_heads"],
            },
            "eos_token_id": eos,
            "pad_token_id": eos,
            "type": "llama",
            "vocab_size": c["vocab_size"],
        },
        "search": {
            "do_sample": False,
            "max_length": min(2048, c["max_position_embeddings"]),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def build_onnx_base(
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Build the ONNX model (float32, LoRA inputs on every linear layer) for a base GGUF; write it atomically.

    A ``genai_config.json`` is written beside ``out`` (for onnxruntime-genai).
    """
    onnx = onnx_deps.onnx()
    out = Path(out)
    config = hf_llama_config(base)
    state = hf_state_dict(base, llama_weight_keys(config["num_hidden_layers"]))
    model = build_llama_graph(state, config, name=read_base_model(base).name, progress=progress)
    del state
    with atomic_output(out.parent / GENAI_CONFIG) as tmp:
        tmp.write_text(json.dumps(genai_config(base, out.name), indent=2))
    with atomic_output(out) as tmp:
        onnx.save_model(model, str(tmp))
    return out


def onnx_base_model(
    base: str | os.PathLike | None = None,
    *,
    rebuild: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Path of the cached ONNX base model for ``base`` (default: the embedded SmolLM2 GGUF), building it if needed."""
    base = base or default_base_model()
    path = onnx_base_path(base)
    if rebuild or not path.is_file():
        build_onnx_base(base, path, progress=progress)
    elif not (path.parent / GENAI_CONFIG).is_file():
        with atomic_output(path.parent / GENAI_CONFIG) as tmp:
            tmp.write_text(json.dumps(genai_config(base, path.name), indent=2))
    return path


def _session_options(ort: Any, threads: int | None) -> Any:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # LoRA inputs with initializers warn once per input; that is intended
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class OnnxLoraModel:
    """An onnxruntime session over an ONNX model with LoRA inputs (loramux's base, or a builder model with LoRA inputs)."""

    def __init__(
        self, path: str | os.PathLike | None = None, *, threads: int | None = None, providers: Sequence[str] | None = None
    ) -> None:
        self.ort = onnx_deps.onnxruntime()
        self.path = Path(path) if path is not None else onnx_base_model()
        self.session = self.ort.InferenceSession(
            str(self.path), _session_options(self.ort, threads), providers=list(providers or ["CPUExecutionProvider"])
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        # LoRA inputs have default values (initializers), so onnxruntime lists them as overridable initializers.
        overridable = {i.name: i for i in self.session.get_overridable_initializers()}
        self.lora_inputs: dict[str, list[Any]] = {n: i.shape for n, i in {**inputs, **overridable}.items() if ".lora_" in n}
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_key)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        if self.past_names:
            shape = inputs[self.past_names[0]].shape
            self.n_kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.output_names = ["logits"] + self.present_names

    # --- adapters -------------------------------------------------------------------
    def load_adapter(self, path: str | os.PathLike) -> Any:
        """An ``onnxruntime.LoraAdapter`` for an adapter file, checked against this model's LoRA inputs."""
        params = read_onnx_adapter(path)
        self.check_parameters(params, where=str(path))
        adapter = self.ort.LoraAdapter()
        adapter.Load(str(path))
        return adapter

    def check_parameters(self, params: Mapping[str, np.ndarray], *, where: str = "adapter") -> None:
        """Raise AdapterError if a parameter has no LoRA input of that name or a shape that cannot fit it."""
        for name, array in params.items():
            shape = self.lora_inputs.get(name)
            if shape is None:
                raise AdapterError(
                    f"{where}: parameter {name!r} is not a LoRA input of {self.path.name}; was it converted for another base model?"
                )
            fixed = [(d, n) for d, n in zip(shape, array.shape) if isinstance(d, int)]
            if len(array.shape) != len(shape) or any(d != n for d, n in fixed):
                raise AdapterError(f"{where}: parameter {name!r} has shape {list(array.shape)}, the model's input is {shape}")

    def _run(self, feed: dict[str, np.ndarray], adapter: AdapterLike) -> list[np.ndarray]:
        run_options = None
        if isinstance(adapter, Mapping):
            self.check_parameters(adapter, where="LoRA parameters")
            feed.update({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.items()})
        elif adapter is not None:
            if isinstance(adapter, (str, os.PathLike)):
                adapter = self.load_adapter(adapter)
            run_options = self.ort.RunOptions()
            # RunOptions keeps a plain pointer to the adapter: `adapter` must stay referenced until
            # session.run returns (a temporary here silently runs the base model instead).
            run_options.add_active_adapter(adapter)
        results = self.session.run(self.output_names, feed, run_options)
        del adapter
        return results

    # --- inference ------------------------------------------------------------------
    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.n_kv_heads, 0, self.head_dim), np.float32)
        return {n: empty for n in self.past_names}

    def logits(self, input_ids: Sequence[int] | np.ndarray, *, adapter: AdapterLike = None) -> np.ndarray:
        """Logits ``[batch, sequence, vocab]`` for whole prompts (no cache); a 1-D list is one prompt."""
        ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        b, n = ids.shape
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((b, n), np.int64),
            "position_ids": np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy(),
            **self._empty_past(b),
        }
        return self._run(feed, adapter)[0]

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 32,
        adapter: AdapterLike = None,
        stop_ids: Iterable[int] = (),
    ) -> list[int]:
        """Greedy decoding of one prompt with the KV cache; returns the new tokens (the stop token excluded)."""
        if isinstance(adapter, (str, os.PathLike)):
            adapter = self.load_adapter(adapter)  # load once, not per step
        stop = set(stop_ids)
        ids = np.asarray(prompt_ids, dtype=np.int64)[None, :]
        past = self._empty_past(1)
        total = 0
        out: list[int] = []
        for _ in range(max_new_tokens):
            n = ids.shape[1]
            feed = {
                "input_ids": ids,
                "attention_mask": np.ones((1, total + n), np.int64),
                "position_ids": np.arange(total, total + n, dtype=np.int64)[None, :],
                **past,
            }
            results = self._run(feed, adapter)
            token = int(np.argmax(results[0][0, -1]))
            total += n
            past = dict(zip(self.past_names, results[1:]))
            if token in stop:
                break
            out.append(token)
            ids = np.array([[token]], dtype=np.int64)
        return out


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[1]), parts[2]
