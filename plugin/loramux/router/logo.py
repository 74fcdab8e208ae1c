"""LoGo routing: each adapter is scored by the size of its own output on the prompt, no training, no samples.

One forward pass of the prompt (one user turn of the chat template, so the last token is where
the answer starts) runs through llama.cpp with the pool's adapters set on the probe context
(``active``: ``all`` = every adapter at weight 1, LoGo's setting; ``uniform`` = 1/n each;
``base`` = none). At one layer's module (default: the last layer's q projection, ``attn_q``) the
graph's real input ``x`` of that module at the last prompt token is read (``attn_norm-L``: after
the RMSNorm, which is what q_proj multiplies; LoGo's code reads the residual stream before the
norm instead). For every adapter ``e`` that adapts that module, its LoRA output is
``o_e = k_e * B_e (A_e x)`` (A, B and ``k_e = alpha / r`` exactly as llama.cpp applies the GGUF),
and its score is ``||o_e||`` (``score=norm``, LoGo's), the inverse entropy of ``softmax(o_e)``
(``score=entropy``, LoGo's other), or ``||o_e|| / (||k_e B_e A_e||_2 ||x||)`` (``score=relative``:
the share of the adapter's largest gain that this input draws out, so an adapter with large
weights does not win every prompt; no samples needed). The ``k`` highest-scoring adapters are kept with ``w = s / sum(s)``.

Each pass starts from an empty K/V and the same adapter set (LoGo's code leaves the previous
prompt's adapters active for the next scoring pass). Adapters that do not adapt the module are
not scored (``Routing.scores`` leaves them out).

``k``: LoGo keeps 20 of 260 adapters (about 8 %); with a pool of 22 task adapters the default is 3,
the same as retrieval and LoraRetriever's top-3, so a prompt can mix at most three adapters
(measured against k=1 in BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loramux.errors import MixError
from loramux.mix import Mix
from loramux.probe import layer_index
from loramux.router.options import parse_options
from loramux.router.selection import Routing, softmax

DEFAULTS: dict[str, Any] = {"k": 3, "score": "norm", "layer": -1, "module": "attn_q", "active": "all", "template": "chat"}
SCORES = ("norm", "entropy", "relative")
ACTIVE_SETS = ("all", "uniform", "base")
ALPHA_KEY = "adapter.lora.alpha"
# modules whose input is the attention norm's output (ggml tensor attn_norm-L in every graph loramux converts for)
ATTENTION_INPUTS = ("attn_q", "attn_k", "attn_v", "attn_qkv")


def lora_factors(gguf_path: Path, tensor: str) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(A (r, in), B (out, r), k = alpha/r) of ``tensor`` in a GGUF adapter, or None when it does not adapt it."""
    from loramux.converters.gguf_header import read_gguf_header
    from loramux.converters.gguf_to_torch import dequantized_tensors
    from loramux.converters.scale import llama_scaling

    names = {f"{tensor}.lora_a", f"{tensor}.lora_b"}
    arrays = dequantized_tensors(gguf_path, names)
    if len(arrays) < 2:
        return None
    a, b = arrays[f"{tensor}.lora_a"], arrays[f"{tensor}.lora_b"]
    alpha = float(read_gguf_header(gguf_path).metadata.get(ALPHA_KEY) or 0.0)
    return a, b, llama_scaling(alpha, a.shape[0])


def spectral_norm(a: np.ndarray, b: np.ndarray, k: float) -> float:
    """The largest singular value of ``k B A`` (from the r x r core, without forming B A)."""
    qa = np.linalg.qr(a.astype(np.float64).T)[1]  # A^T = Q_a R_a
    qb = np.linalg.qr(b.astype(np.float64))[1]  # B = Q_b R_b
    return float(abs(k) * np.linalg.norm(qb @ qa.T, 2))


def inverse_entropy(o: np.ndarray) -> float:
    p = softmax(o)
    return float(1.0 / max(-(p * np.log(np.maximum(p, 1e-300))).sum(), 1e-12))


class LogoRouter:
    """Scores the pool's adapters by their own LoRA output at one module, per prompt."""

    def __init__(self, pool: Any, *, options: str | None = None) -> None:
        s = parse_options(options, DEFAULTS, source="logo")
        if s["k"] < 1 or s["score"] not in SCORES or s["active"] not in ACTIVE_SETS or s["template"] not in ("chat", "raw"):
            raise MixError(f"logo: want k >= 1, score in {SCORES}, active in {ACTIVE_SETS}, template chat|raw; got {s}")
        self.pool, self.settings = pool, s
        self.layer = layer_index(pool.n_layer, s["layer"])
        module = s["module"]
        if module == "attn_q" and f"blk.{self.layer}.attn_q.weight" not in pool.base_info.tensor_shapes:
            module = "attn_qkv"  # Phi-3 keeps q, k and v fused: the same input, the fused output
        self.tensor = f"blk.{self.layer}.{module}.weight"
        self.input_name = f"attn_norm-{self.layer}" if module in ATTENTION_INPUTS else None
        if self.input_name is None:
            raise MixError(f"logo: module {module!r} is not supported ({', '.join(ATTENTION_INPUTS)}: their input is attn_norm)")
        self._factors: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, float] | None] = {}

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.pool.names)

    def _factors_of(self, name: str):
        entry = self.pool.adapters[name]
        key = (name, entry.sha256)
        if key not in self._factors:
            self._factors[key] = lora_factors(entry.gguf_path, self.tensor)
        return self._factors[key]

    def _active(self, names: list[str]) -> Mix:
        mode = self.settings["active"]
        if mode == "base":
            return Mix()
        weight = 1.0 if mode == "all" else 1.0 / len(names)
        return Mix(dict.fromkeys(names, weight))

    def query(self, prompt: str) -> np.ndarray:
        """x: the module's input at the last prompt token, under the active adapter set."""
        names = list(self.pool.names)
        text = self.pool.chat_prompt([{"role": "user", "content": str(prompt)}]) if self.settings["template"] == "chat" else str(prompt)
        ids = self.pool.tokenize(text, add_bos=self.settings["template"] == "raw", special=True)[-self.pool.n_ctx :]
        rows = self.pool.hidden_states(ids, [self.input_name], mix=self._active(names))[self.input_name]
        return rows[-1].astype(np.float64)

    def scores(self, prompt: str) -> dict[str, float]:
        """Each adapter's score (only adapters that adapt the module)."""
        x = self.query(prompt)
        out: dict[str, float] = {}
        for name in self.pool.names:
            factors = self._factors_of(name)
            if factors is None:
                continue
            a, b, k = factors
            o = k * (b.astype(np.float64) @ (a.astype(np.float64) @ x))
            out[name] = self._score(o, factors, x)
        if not out:
            raise MixError(f"logo: no loaded adapter adapts {self.tensor}")
        return out

    def _score(self, o: np.ndarray, factors, x: np.ndarray) -> float:
        kind = self.settings["score"]
        if kind == "entropy":
            return inverse_entropy(o)
        norm = float(np.linalg.norm(o))
        if kind == "relative":  # how much of the adapter's largest possible gain this x draws out
            a, b, k = factors
            return norm / max(spectral_norm(a, b, k) * float(np.linalg.norm(x)), 1e-30)
        return norm

    def route(self, prompt: str) -> Routing:
        scores = self.scores(prompt)
        ranked = sorted(scores, key=lambda n: -scores[n])[: self.settings["k"]]
        total = sum(scores[n] for n in ranked)
        mix = Mix({n: scores[n] / total for n in ranked}) if total > 0 else Mix()
        return Routing(mix, scores, None, ranked[0], scores[ranked[0]] / total if total > 0 else 0.0)

    def close(self) -> None:
        pass


__all__ = ["DEFAULTS", "LogoRouter", "inverse_entropy", "lora_factors"]
