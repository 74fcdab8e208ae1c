"""Prompt embeddings from what the pool already has: no extra model, nothing downloaded.

Three features (``FEATURES``):

- ``token_meanmax`` (default): the mean and the element-wise maximum of the prompt's token
  embeddings (the base GGUF's ``token_embd`` table), side by side. No forward pass: about a
  millisecond per prompt. The maximum keeps the rare tokens that tell near-identical task formats
  apart (three vs seven objects), which the mean averages away: on the BBH dev rows of the 22
  adapter tasks, retrieval top-1 0.961 with it vs 0.931 with the mean alone (BENCHMARKS.md).
- ``token_mean``: the mean alone (the ONNX router's input).
- ``hidden:L``: the mean over the prompt's tokens of the residual stream after layer ``L``
  (``l_out-L``, negative counts from the end) of a real forward pass of the base model through
  llama.cpp (:class:`loramux.probe.HiddenProbe`). One prefill per prompt.

All are float32 vectors (the model's width; twice that for ``token_meanmax``). Prompts are the raw text (no chat template).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from loramux.errors import MixError
from loramux.probe import layer_index

FEATURES = ("token_meanmax", "token_mean", "hidden:L")
DEFAULT_FEATURE = "token_meanmax"


def check_feature(feature: str) -> str:
    """``feature`` if it is one of :data:`FEATURES` (``hidden:L`` with a whole number L)."""
    kind, _, layer = feature.partition(":")
    if kind in ("token_mean", "token_meanmax") and not layer:
        return feature
    if kind == "hidden":
        try:
            int(layer)
            return feature
        except ValueError:
            pass
    raise MixError(f"unknown prompt feature {feature!r}; known: {', '.join(FEATURES)} (e.g. hidden:-8)")


class PromptEmbedder:
    """Embeds prompts with one feature of the pool's base model."""

    def __init__(self, pool: Any, feature: str = DEFAULT_FEATURE) -> None:
        self.pool = pool
        self.feature = check_feature(feature)
        self._table: np.ndarray | None = None
        self._tensor: str | None = None
        if feature.startswith("hidden:"):
            self._tensor = f"l_out-{layer_index(pool.n_layer, int(feature.partition(':')[2]))}"

    def _token_table(self) -> np.ndarray:
        if self._table is None:
            from loramux.router.features import token_embedding_table

            self._table = token_embedding_table(self.pool.base_path)
        return self._table

    def embed_one(self, prompt: str) -> np.ndarray:
        """The feature vector of ``prompt`` (float32, the model's width)."""
        if self._tensor is None:
            ids = self.pool.tokenize(str(prompt), special=False) or [self.pool.token_eos()]
            rows = self._token_table()[np.asarray(ids)]
            if self.feature == "token_mean":
                return rows.mean(axis=0)
            return np.concatenate([rows.mean(axis=0), rows.max(axis=0)])
        ids = self.pool.tokenize(str(prompt), add_bos=True, special=False)[: self.pool.n_ctx]
        rows = self.pool.probe().capture(ids, [self._tensor])[self._tensor]
        return rows.mean(axis=0)

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """``(len(prompts), width)`` feature vectors."""
        return np.stack([self.embed_one(p) for p in prompts]).astype(np.float32)


__all__ = ["DEFAULT_FEATURE", "FEATURES", "PromptEmbedder", "check_feature"]
