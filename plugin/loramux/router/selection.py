"""From router scores to a Mix: temperature, confidence threshold and fallback, top-k, top-p, minimum weight.

The policy, in order (pure numpy, one prompt at a time):

1. ``p = softmax(logits / temperature)`` over every outcome: one per adapter, plus a
   "none of these" outcome when the router was trained with one.
2. **Fallback.** The confidence is the largest adapter probability in ``p`` (not renormalised,
   so probability given to "none" lowers it). If "none" is the single most probable outcome
   (``reason = "none"``), or the confidence is below ``threshold`` (``reason = "low_confidence"``),
   the request gets the fallback mix:

   - ``fallback="uniform"`` (default): every adapter of the router at ``fallback_weight / n_adapters``
     (``fallback_weight=1.0`` is the ``uniform`` mode of ``loramux eval``; less is a lower-weight mix);
   - ``fallback="base"``: the empty mix, i.e. the base model alone.

   Why uniform by default: on dev prompts of the five BBH tasks without an adapter (10 per task),
   the base model answers 0/50 in the tasks' format; the router with the base fallback 1/50, with
   the uniform fallback 7/50 (see BENCHMARKS.md, "Router"). The uniform mix decodes slower (every
   adapter runs), which only matters for prompts the router does not recognise.
3. Otherwise the adapter probabilities are renormalised to sum to 1 and sorted (ties keep the
   router's adapter order); the ``top_k`` most probable are kept; of those, the shortest prefix
   whose renormalised mass reaches ``top_p`` (nucleus); the kept weights are renormalised to sum
   to 1; weights below ``min_weight`` are dropped (the most probable adapter never is) and the
   rest renormalised again.

The weights of a routed mix therefore always sum to 1: a clear one-adapter decision gives that
adapter at weight 1.0, exactly the adapter as trained.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from loramux.mix import Mix
from loramux.router.errors import RouterSettingsError

FALLBACKS = ("base", "uniform")


@dataclass(frozen=True)
class SelectionSettings:
    """How router scores become a mix (defaults are stored in the router file and can be overridden per call)."""

    top_k: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    min_weight: float = 0.05
    threshold: float = 0.5
    fallback: str = "uniform"
    fallback_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise RouterSettingsError(f"top_k must be a whole number >= 1, got {self.top_k!r}")
        checks = [
            ("top_p", self.top_p, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
            ("temperature", self.temperature, lambda v: v > 0.0, "> 0"),
            ("min_weight", self.min_weight, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("threshold", self.threshold, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
            ("fallback_weight", self.fallback_weight, lambda v: 0.0 < v <= 4.0, "in (0, 4]"),
        ]
        for name, value, ok, want in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(float(value)):
                raise RouterSettingsError(f"{name} must be a finite number {want}, got {value!r}")
        if self.fallback not in FALLBACKS:
            raise RouterSettingsError(f"fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")

    def with_overrides(self, **overrides: Any) -> "SelectionSettings":
        """A copy with the given fields replaced (``None`` values are ignored)."""
        unknown = sorted(set(overrides) - set(self.__dataclass_fields__))
        if unknown:
            raise RouterSettingsError(f"unknown selection setting(s) {unknown}; known: {sorted(self.__dataclass_fields__)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SelectionSettings":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Routing:
    """What the router decided for one prompt: the mix, and the scores it came from."""

    mix: Mix
    scores: dict[str, float]  # softmax(logits / T) per adapter (not renormalised)
    none_score: float | None  # probability of "none of these" (None: the router has no such outcome)
    top1: str  # the most probable adapter (even when the fallback was taken)
    confidence: float  # scores[top1]
    fallback: str | None = None  # None, or why the fallback mix was used: "none" / "low_confidence"
    settings: SelectionSettings = field(default_factory=SelectionSettings)

    def to_json(self) -> dict[str, Any]:
        """``{"mix", "top1", "confidence", "fallback", "none_score", "scores"}`` (scores sorted, highest first)."""
        return {
            "mix": self.mix.to_dict(),
            "top1": self.top1,
            "confidence": self.confidence,
            "fallback": self.fallback,
            "none_score": self.none_score,
            "scores": dict(sorted(self.scores.items(), key=lambda kv: -kv[1])),
        }


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` along the last axis (float64)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def select(
    logits: np.ndarray,
    adapters: Sequence[str],
    settings: SelectionSettings,
    *,
    none_outcome: bool = False,
) -> Routing:
    """Turn one prompt's logits (``len(adapters)`` values, plus one for "none" last) into a :class:`Routing`."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    n = len(adapters)
    if logits.shape[0] != n + int(none_outcome):
        raise RouterSettingsError(f"router gave {logits.shape[0]} scores for {n} adapters{' and none' if none_outcome else ''}")
    p = softmax(logits, settings.temperature)
    adapter_p = p[:n]
    none_p = float(p[n]) if none_outcome else None
    top = int(np.argmax(adapter_p))
    confidence = float(adapter_p[top])
    scores = {name: float(v) for name, v in zip(adapters, adapter_p)}

    reason = None
    if none_p is not None and none_p > confidence:
        reason = "none"
    elif confidence < settings.threshold:
        reason = "low_confidence"
    if reason is not None:
        mix = Mix() if settings.fallback == "base" else Mix({a: settings.fallback_weight / n for a in adapters})
        return Routing(mix, scores, none_p, adapters[top], confidence, reason, settings)

    q = adapter_p / adapter_p.sum()
    order = np.argsort(-q, kind="stable")[: settings.top_k]
    cumulative = np.cumsum(q[order])
    # shortest prefix reaching top_p; the small slack keeps p=1.0 from failing on rounding
    n_keep = int(np.searchsorted(cumulative, settings.top_p - 1e-12) + 1)
    order = order[: max(1, min(n_keep, len(order)))]
    w = q[order] / q[order].sum()
    keep = w >= settings.min_weight
    keep[0] = True
    order, w = order[keep], w[keep]
    w = w / w.sum()
    mix = Mix({adapters[i]: float(x) for i, x in zip(order, w)})
    return Routing(mix, scores, none_p, adapters[top], confidence, None, settings)


__all__ = ["FALLBACKS", "Routing", "SelectionSettings", "select", "softmax"]
