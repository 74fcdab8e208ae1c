"""The router network (torch, ``train`` extra) and its folded, export-ready weights (numpy).

``RouterNet`` is a small MLP over the masked mean of the base model's token embeddings:

    x      = mean over the prompt's tokens of token_embd[id]          (frozen table, n_vocab x n_embd)
    h      = relu(W1 ((x - mu) / sigma) + b1)                         (W1: hidden x n_embd, trained)
    logits = W2 h + b2                                                (W2: n_outcomes x hidden, trained)

``mu`` and ``sigma`` standardise the pooled features (measured on the training rows). Only W1, b1,
W2, b2 are trained: ``n_embd * hidden + hidden + hidden * n_outcomes + n_outcomes`` parameters
(about 40 k for SmolLM2 with hidden=64 and 23 outcomes). The big table stays frozen.

Because the mean and W1 are linear, the first layer folds into the table for export:
``W1 ((x - mu) / sigma) + b1 = mean_t T[id_t] + b1'`` with ``T = token_embd @ (W1 / sigma)^T``
(``n_vocab x hidden``) and ``b1' = b1 - (W1 / sigma) mu``. The ONNX graph stores ``T`` instead of
the 576-wide table: ``hidden / n_embd`` of its size, and a narrower gather per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class FoldedRouter:
    """The exported form: ``logits = W2 relu(mean_t T[id_t] + b1) + b2`` (float32 arrays)."""

    table: np.ndarray  # (n_vocab, hidden)
    bias1: np.ndarray  # (hidden,)
    weight2: np.ndarray  # (n_outcomes, hidden)
    bias2: np.ndarray  # (n_outcomes,)

    @property
    def n_outcomes(self) -> int:
        return int(self.weight2.shape[0])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The folded network in numpy (a second reference for the ONNX graph)."""
        mask = attention_mask.astype(np.float32)
        rows = self.table[input_ids] * mask[..., None]
        pooled = rows.sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        hidden = np.maximum(pooled + self.bias1, 0.0)
        return hidden @ self.weight2.T + self.bias2


class RouterNet(nn.Module):
    """Frozen token-embedding table, masked mean pooling, standardisation, one hidden ReLU layer (dropout after it)."""

    def __init__(self, embeddings: torch.Tensor, n_outcomes: int, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        n_vocab, n_embd = embeddings.shape
        self.register_buffer("embeddings", embeddings.float(), persistent=False)  # frozen, from the base GGUF
        self.register_buffer("feature_mean", torch.zeros(n_embd))
        self.register_buffer("feature_std", torch.ones(n_embd))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(n_embd, hidden)
        self.head = nn.Linear(hidden, n_outcomes)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of the embedding rows: ``(batch, seq)`` ids -> ``(batch, n_embd)``."""
        mask = attention_mask.to(self.embeddings.dtype)
        rows = self.embeddings[input_ids] * mask.unsqueeze(-1)
        return rows.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)

    def pool_flat(self, flat_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The same mean for ragged prompts given as one flat id list and start offsets (fast, for training)."""
        return nn.functional.embedding_bag(flat_ids, self.embeddings, offsets, mode="mean")

    def set_standardisation(self, pooled: torch.Tensor) -> None:
        """Measure mu and sigma of the pooled features on the training rows."""
        self.feature_mean.copy_(pooled.mean(dim=0))
        self.feature_std.copy_(pooled.std(dim=0).clamp(min=1e-6))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features."""
        x = (pooled - self.feature_mean) / self.feature_std
        return self.head(self.dropout(torch.relu(self.proj(x))))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(input_ids, attention_mask))

    @torch.no_grad()
    def fold(self) -> FoldedRouter:
        """The export-ready weights (see the module docstring); exact up to float32 rounding."""
        w1 = self.proj.weight.double() / self.feature_std.double()  # (hidden, n_embd)
        b1 = self.proj.bias.double() - w1 @ self.feature_mean.double()
        table = self.embeddings.double() @ w1.T  # (n_vocab, hidden)
        return FoldedRouter(
            table=table.float().numpy().copy(),
            bias1=b1.float().numpy().copy(),
            weight2=self.head.weight.detach().float().numpy().copy(),
            bias2=self.head.bias.detach().float().numpy().copy(),
        )


__all__ = ["FoldedRouter", "RouterNet"]
