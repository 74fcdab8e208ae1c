"""The router's input features: the prompt's token ids from the base model's own tokenizer.

The recipe (stored in every router file, so the runtime computes exactly what training saw):

1. the text is the user's ``input`` as given, without the chat template (the template wrapper is
   the same for every prompt, so it carries no routing signal);
2. it is tokenized by the base GGUF's tokenizer (llama.cpp, vocab only), without BOS/EOS and
   without parsing special tokens (user text that spells ``<|im_end|>`` stays text);
3. the first ``max_tokens`` ids are kept;
4. the router graph pools the rows of a table derived from the base GGUF's ``token_embd.weight``
   (dequantized) over the tokens: a masked mean, so batches may be padded with any id.

Nothing outside the base model file is needed: no second model, no download.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from loramux.errors import RuntimeLoadError
from loramux.router.errors import RouterFileError

FEATURE_KIND = "mean_token_embedding"
SOURCE_TENSOR = "token_embd.weight"


@dataclass(frozen=True)
class FeatureRecipe:
    """How a prompt becomes the router's input (stored in the router file's metadata)."""

    kind: str = FEATURE_KIND  # masked mean of per-token rows of a table made from token_embd
    source_tensor: str = SOURCE_TENSOR
    text: str = "input"  # the raw user input, no chat template
    add_special: bool = False  # no BOS/EOS
    parse_special: bool = False  # special-token text stays text
    max_tokens: int = 1024  # longer prompts keep their first max_tokens ids
    embedding_dim: int = 0  # width of token_embd (576 for SmolLM2-135M)
    projected_dim: int = 0  # width of the table stored in the ONNX file

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FeatureRecipe":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        recipe = cls(**known)
        if recipe.kind != FEATURE_KIND:
            raise RouterFileError(
                f"router features of kind {recipe.kind!r} are not known to this loramux (it computes {FEATURE_KIND!r}); "
                "upgrade loramux or retrain the router"
            )
        return recipe


class BaseTokenizer:
    """The base GGUF's tokenizer through llama.cpp, loaded vocab-only (no weights, no context).

    Owns one ``llama_model *``; call :meth:`close` (or use as a context manager) to free it.
    Thread-safe: every call tokenizes into its own buffer.
    """

    _backend_lock = threading.Lock()
    _backend_ready = False

    def __init__(self, base: str | os.PathLike) -> None:
        import llama_cpp

        from loramux.llama_runtime import capture_llama_log

        self.path = Path(base)
        if not self.path.is_file():
            raise RuntimeLoadError(f"base model {self.path} does not exist (loramux fetch-base writes the default one)")
        with BaseTokenizer._backend_lock:
            if not BaseTokenizer._backend_ready:
                llama_cpp.llama_backend_init()
                BaseTokenizer._backend_ready = True
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with capture_llama_log() as log:
            model = llama_cpp.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not model:
            raise RuntimeLoadError(f"llama.cpp could not read the tokenizer of {self.path}: {log.reason()}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._llama_tokenize = llama_cpp.llama_tokenize
        self._token_t = llama_cpp.llama_token

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> np.ndarray:
        """Token ids of ``text`` (int64), as llama.cpp's ``llama_tokenize`` gives them."""
        if self._model is None:
            raise RuntimeLoadError(f"the tokenizer of {self.path} was closed")
        data = text.encode("utf-8")
        capacity = len(data) + 8  # a token covers at least one byte, plus BOS/EOS
        buf = (self._token_t * capacity)()
        n = self._llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:  # cannot happen with this capacity, but llama.cpp's contract says retry with -n
            capacity = -n
            buf = (self._token_t * capacity)()
            n = self._llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            raise RuntimeLoadError(f"llama_tokenize failed ({n}) on a text of {len(data)} bytes")
        return np.frombuffer(buf, dtype=np.int32, count=n).astype(np.int64)

    def close(self) -> None:
        """Free the vocab-only model (idempotent)."""
        import llama_cpp

        if getattr(self, "_model", None) is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "BaseTokenizer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def prompt_ids(tokenizer: BaseTokenizer, text: str, recipe: FeatureRecipe) -> np.ndarray:
    """The ids the router sees for ``text`` under ``recipe`` (tokenized, then truncated)."""
    ids = tokenizer.tokenize(text, add_special=recipe.add_special, parse_special=recipe.parse_special)
    return ids[: recipe.max_tokens]


def pad_batch(sequences: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, both int64 ``(batch, longest)``; padding is ``pad_id`` with mask 0.

    An empty sequence gets one masked position, so the batch always has a sequence axis of at least 1.
    """
    longest = max([1, *(len(s) for s in sequences)])
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def token_embedding_table(base: str | os.PathLike) -> np.ndarray:
    """The base GGUF's ``token_embd.weight``, dequantized to float32, shape ``(n_vocab, n_embd)``."""
    from loramux.converters.gguf_to_torch import dequantized_tensors

    tensors = dequantized_tensors(base, names={SOURCE_TENSOR})
    if SOURCE_TENSOR not in tensors:
        raise RuntimeLoadError(f"base model {base} has no {SOURCE_TENSOR} tensor: the router's features need it")
    return tensors[SOURCE_TENSOR]


__all__ = ["BaseTokenizer", "FEATURE_KIND", "FeatureRecipe", "pad_batch", "prompt_ids", "token_embedding_table"]
