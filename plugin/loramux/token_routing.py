"""Per-token routing modes of a mix: Arrow and SpectR, chosen inside the graph for every token.

A routed mix has no fixed weights: at every adapted base weight, every token of the sequence
picks its own top-``k`` adapters among all the adapters registered on the pool (those that adapt
that weight), the way a mixture-of-experts layer gates its experts (``native/README.md``):

- ``arrow``: scores ``|x . v_e|`` (``v_e``: the top right singular vector of adapter e's delta at
  that weight), weights ``softmax(s / T)`` over the top k (defaults k=3, T=1);
- ``spectr``: scores ``||Q_e^T x|| / sqrt(r_e)`` (``Q_e``: the delta's row space, ``r_e`` its rank; per rank, so that
  adapters of different ranks compete on equal terms: with one rank, SpectR's own choices), uniform weights ``1/k``
  (default k=4; it takes no temperature).

Spec strings (``--mix``, the server's ``mix`` and ``model``): ``arrow``, ``arrow:k=2,T=0.5``,
``spectr``, ``spectr:k=3``. JSON form (:meth:`TokenRouting.to_json`): ``{"mode": "arrow", "k": 3,
"temperature": 1.0}`` (``temperature`` is null for spectr). :class:`loramux.mix.Mix` carries one in
``Mix.token_routing``; this module only parses and validates (it imports nothing heavy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from loramux.errors import MixError

ROUTING_MODES: tuple[str, ...] = ("arrow", "spectr")
DEFAULT_K = {"arrow": 3, "spectr": 4}
DEFAULT_TEMPERATURE = 1.0  # Arrow's; SpectR has none
MAX_K = 64  # the same bound as the adapters of a fixed mix (loramux.mix.MAX_MIX_ADAPTERS)
SPEC_USAGE = "arrow[:k=3,T=1] or spectr[:k=4]"


def is_routing_spec(text: Any) -> bool:
    """Whether ``text`` is a routed-mix spec (``arrow``, ``spectr``, ``arrow:...``), not ``name=w,...``."""
    return isinstance(text, str) and text.strip().partition(":")[0].strip() in ROUTING_MODES


def _format_float(x: float) -> str:
    """The shortest text that parses back to ``x`` exactly, without a trailing ``.0`` (``1.0`` -> ``1``)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class TokenRouting:
    """A per-token routing mode: ``mode`` ("arrow" or "spectr"), top-``k``, Arrow's ``temperature``.

    ``k=None`` takes the mode's default (arrow 3, spectr 4); ``temperature=None`` takes Arrow's
    default (1.0) and is the only value SpectR takes (its weights are uniform). Raises MixError
    for anything else (unknown mode, k not a whole number in 1..64, T not finite and > 0)."""

    mode: Literal["arrow", "spectr"] = "arrow"
    k: int | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ROUTING_MODES:
            raise MixError(f"routing mode {self.mode!r} is not one of {', '.join(ROUTING_MODES)}")
        k = DEFAULT_K[self.mode] if self.k is None else self.k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise MixError(f"k of {self.mode} must be a whole number from 1 to {MAX_K}, got {k!r}")
        object.__setattr__(self, "k", k)
        t = self.temperature
        if self.mode == "spectr":
            if t is not None:
                raise MixError(f"spectr takes no temperature (its weights are uniform, 1/k), got T={t!r}; write spectr:k={k}")
            return
        t = DEFAULT_TEMPERATURE if t is None else t
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise MixError(f"the temperature T of arrow must be a finite number > 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))

    @classmethod
    def parse(cls, text: str) -> "TokenRouting":
        """``arrow``, ``arrow:k=3,T=1``, ``spectr``, ``spectr:k=4`` (spaces around items ignored)."""
        head, sep, options = text.strip().partition(":")
        mode = head.strip()
        if mode not in ROUTING_MODES:
            raise MixError(f"mix {text!r} is not a routing mode; write {SPEC_USAGE}")
        if sep and not options.strip():
            raise MixError(f"mix {text!r} has nothing after ':'; write {mode}, or {SPEC_USAGE}")
        given: dict[str, str] = {}
        for item in options.split(",") if sep else []:
            key, eq, value = (s.strip() for s in item.partition("="))
            allowed = ("k", "T") if mode == "arrow" else ("k",)
            if not eq or key not in allowed:
                hint = "k=N, T=X" if mode == "arrow" else "k=N (spectr takes no temperature)"
                raise MixError(f"mix {text!r}: unknown option {item.strip()!r} for {mode}; its options are {hint}")
            if key in given:
                raise MixError(f"mix {text!r}: option {key} is given twice")
            given[key] = value
        try:
            return cls(mode, _parse_k(given.get("k")), _parse_t(given.get("T")))
        except MixError as exc:
            raise MixError(f"mix {text!r}: {exc}") from None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TokenRouting":
        """The inverse of :meth:`to_json`: ``{"mode": ..., "k": ..., "temperature": ...}`` (k and temperature optional)."""
        unknown = sorted(set(data) - {"mode", "k", "temperature"})
        if unknown:
            raise MixError(f"routed mix {dict(data)!r}: unknown key(s) {', '.join(unknown)}; keys are mode, k, temperature")
        return cls(data.get("mode"), data.get("k"), data.get("temperature"))  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """``{"mode": ..., "k": ..., "temperature": ...}`` (temperature None for spectr)."""
        return {"mode": self.mode, "k": self.k, "temperature": self.temperature}

    def native_args(self) -> tuple[str, int, float]:
        """``(mode, k, temperature)`` as ``SeqMixer.set_routing`` takes them (SpectR's temperature is unused)."""
        return self.mode, int(self.k or 0), DEFAULT_TEMPERATURE if self.temperature is None else self.temperature

    def __str__(self) -> str:
        if self.mode == "spectr":
            return f"spectr:k={self.k}"
        return f"arrow:k={self.k},T={_format_float(self.temperature or DEFAULT_TEMPERATURE)}"


def _parse_k(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise MixError(f"k must be a whole number from 1 to {MAX_K}, got {value!r}") from None


def _parse_t(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise MixError(f"the temperature T must be a finite number > 0, got {value!r}") from None


__all__ = ["DEFAULT_K", "DEFAULT_TEMPERATURE", "MAX_K", "ROUTING_MODES", "SPEC_USAGE", "TokenRouting", "is_routing_spec"]
