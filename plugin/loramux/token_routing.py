"""Per-token routing modes of a mix: Arrow, SpectR and LoGo, chosen inside the graph for every token.

A routed mix has no fixed weights: at every adapted base weight, every token of the sequence
picks its own top-``k`` adapters among all the adapters registered on the pool (those that adapt
that weight), the way a mixture-of-experts layer gates its experts (``native/README.md``):

- ``arrow``: scores ``|x . v_e|`` (``v_e``: the top right singular vector of adapter e's delta at
  that weight), weights ``softmax(s / T)`` over the top k (defaults k=3, T=1);
- ``spectr``: scores ``||Q_e^T x|| / sqrt(r_e)`` (``Q_e``: the delta's row space, ``r_e`` its rank; per rank, so that
  adapters of different ranks compete on equal terms: with one rank, SpectR's own choices), uniform weights ``1/k``
  (default k=4; it takes no temperature);
- ``logo-token``: LoGo's signal from the graph, scores ``||D_e x|| / c_e`` (``D_e``: adapter e's delta at that weight,
  its scale as llama.cpp applies it), weights ``s / sum(s)`` over the top k (default k=3, no temperature), with the
  calibration ``cal``: ``none`` (``c_e = 1``, LoGo's raw signal), ``spectral`` (``c_e = ||D_e||_2``; the default, which
  beat the raw signal on the dev split: BENCHMARKS.md) or
  ``frobenius`` (``c_e = ||D_e||_F``). The fused CPU op only: a pool on the device form refuses it. (The spec
  ``logo`` is LoGo the prompt *router*, :mod:`loramux.router.logo`, not this mode.)

Spec strings (``--mix``, the server's ``mix`` and ``model``): ``arrow``, ``arrow:k=2,T=0.5``,
``spectr``, ``spectr:k=3``, ``logo-token``, ``logo-token:k=2,cal=spectral``. JSON form
(:meth:`TokenRouting.to_json`): ``{"mode": "arrow", "k": 3, "temperature": 1.0}`` (``temperature`` is
null for spectr and logo-token; logo-token adds ``"calibration"``). :class:`loramux.mix.Mix` carries one in
``Mix.token_routing``; this module only parses and validates (it imports nothing heavy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from loramux.errors import MixError

ROUTING_MODES: tuple[str, ...] = ("arrow", "spectr", "logo-token")
DEFAULT_K = {"arrow": 3, "spectr": 4, "logo-token": 3}
DEFAULT_TEMPERATURE = 1.0  # Arrow's; SpectR and LoGo have none
CALIBRATIONS: tuple[str, ...] = ("none", "spectral", "frobenius")  # LoGo's c_e: 1, ||D_e||_2, ||D_e||_F
DEFAULT_CALIBRATION = "spectral"  # beats the raw signal on dev (BENCHMARKS.md: LoGo calibrations, benchmarks/logo_pools.py)
# the SeqMixer mode (loramux.native.mixer.ROUTE_MODES, enum loramux_route_mode) of each LoGo calibration
LOGO_NATIVE_MODES = {"none": "logo", "spectral": "logo-spectral", "frobenius": "logo-frobenius"}
MAX_K = 64  # the same bound as the adapters of a fixed mix (loramux.mix.MAX_MIX_ADAPTERS)
SPEC_USAGE = "arrow[:k=3,T=1], spectr[:k=4] or logo-token[:k=3,cal=none|spectral|frobenius]"
_OPTIONS = {"arrow": ("k", "T"), "spectr": ("k",), "logo-token": ("k", "cal")}
_OPTION_HINT = {
    "arrow": "k=N, T=X",
    "spectr": "k=N (spectr takes no temperature)",
    "logo-token": f"k=N, cal={'|'.join(CALIBRATIONS)} (logo-token takes no temperature)",
}


def is_routing_spec(text: Any) -> bool:
    """Whether ``text`` is a routed-mix spec (``arrow``, ``spectr``, ``logo-token``, ``arrow:...``), not ``name=w,...``."""
    return isinstance(text, str) and text.strip().partition(":")[0].strip() in ROUTING_MODES


def _format_float(x: float) -> str:
    """The shortest text that parses back to ``x`` exactly, without a trailing ``.0`` (``1.0`` -> ``1``)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class TokenRouting:
    """A per-token routing mode: ``mode`` ("arrow", "spectr" or "logo-token"), top-``k``, Arrow's
    ``temperature``, LoGo's ``calibration``.

    ``k=None`` takes the mode's default (arrow 3, spectr 4, logo-token 3); ``temperature=None`` takes
    Arrow's default (1.0) and is the only value SpectR and LoGo take; ``calibration=None`` takes LoGo's
    default ("spectral") and is the only value Arrow and SpectR take. Raises MixError for anything else
    (unknown mode, k not a whole number in 1..64, T not finite and > 0, calibration not one of
    none, spectral, frobenius)."""

    mode: Literal["arrow", "spectr", "logo-token"] = "arrow"
    k: int | None = None
    temperature: float | None = None
    calibration: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ROUTING_MODES:
            raise MixError(f"routing mode {self.mode!r} is not one of {', '.join(ROUTING_MODES)}")
        k = DEFAULT_K[self.mode] if self.k is None else self.k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise MixError(f"k of {self.mode} must be a whole number from 1 to {MAX_K}, got {k!r}")
        object.__setattr__(self, "k", k)
        self._check_calibration()
        t = self.temperature
        if self.mode != "arrow":
            if t is not None:
                why = "its weights are uniform, 1/k" if self.mode == "spectr" else "its weights are s / sum(s)"
                raise MixError(f"{self.mode} takes no temperature ({why}), got T={t!r}; write {self._spec()}")
            return
        t = DEFAULT_TEMPERATURE if t is None else t
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise MixError(f"the temperature T of arrow must be a finite number > 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))

    def _check_calibration(self) -> None:
        cal = self.calibration
        if self.mode != "logo-token":
            if cal is not None:
                raise MixError(f"{self.mode} takes no calibration (LoGo's, logo-token:cal=...), got cal={cal!r}")
            return
        cal = DEFAULT_CALIBRATION if cal is None else cal
        if cal not in CALIBRATIONS:
            raise MixError(f"the calibration cal of logo-token must be one of {', '.join(CALIBRATIONS)}, got {cal!r}")
        object.__setattr__(self, "calibration", cal)

    @classmethod
    def parse(cls, text: str) -> "TokenRouting":
        """``arrow``, ``arrow:k=3,T=1``, ``spectr``, ``spectr:k=4``, ``logo-token``, ``logo-token:k=3,cal=spectral``
        (spaces around items ignored)."""
        head, sep, options = text.strip().partition(":")
        mode = head.strip()
        if mode not in ROUTING_MODES:
            raise MixError(f"mix {text!r} is not a routing mode; write {SPEC_USAGE}")
        if sep and not options.strip():
            raise MixError(f"mix {text!r} has nothing after ':'; write {mode}, or {SPEC_USAGE}")
        given: dict[str, str] = {}
        for item in options.split(",") if sep else []:
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key not in _OPTIONS[mode]:
                raise MixError(f"mix {text!r}: unknown option {item.strip()!r} for {mode}; its options are {_OPTION_HINT[mode]}")
            if key in given:
                raise MixError(f"mix {text!r}: option {key} is given twice")
            given[key] = value
        try:
            return cls(mode, _parse_k(given.get("k")), _parse_t(given.get("T")), given.get("cal"))
        except MixError as exc:
            raise MixError(f"mix {text!r}: {exc}") from None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TokenRouting":
        """The inverse of :meth:`to_json`: ``{"mode": ..., "k": ..., "temperature": ..., "calibration": ...}``
        (all but mode optional)."""
        unknown = sorted(set(data) - {"mode", "k", "temperature", "calibration"})
        if unknown:
            raise MixError(
                f"routed mix {dict(data)!r}: unknown key(s) {', '.join(unknown)}; keys are mode, k, temperature, calibration (logo-token)"
            )
        return cls(data.get("mode"), data.get("k"), data.get("temperature"), data.get("calibration"))  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """``{"mode": ..., "k": ..., "temperature": ...}`` (temperature None for spectr and logo-token), plus
        ``"calibration"`` for logo-token."""
        out: dict[str, Any] = {"mode": self.mode, "k": self.k, "temperature": self.temperature}
        if self.mode == "logo-token":
            out["calibration"] = self.calibration
        return out

    def native_args(self) -> tuple[str, int, float]:
        """``(mode, k, temperature)`` as ``SeqMixer.set_routing`` takes them: LoGo's mode names its calibration
        (``logo``, ``logo-spectral``, ``logo-frobenius``); SpectR's and LoGo's temperature is unused."""
        mode = LOGO_NATIVE_MODES[self.calibration or DEFAULT_CALIBRATION] if self.mode == "logo-token" else self.mode
        return mode, int(self.k or 0), DEFAULT_TEMPERATURE if self.temperature is None else self.temperature

    def _spec(self) -> str:
        if self.mode == "spectr":
            return f"spectr:k={self.k}"
        if self.mode == "logo-token":
            return f"logo-token:k={self.k},cal={self.calibration or DEFAULT_CALIBRATION}"
        return f"arrow:k={self.k},T={_format_float(self.temperature or DEFAULT_TEMPERATURE)}"

    def __str__(self) -> str:
        return self._spec()


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


__all__ = [
    "CALIBRATIONS",
    "DEFAULT_CALIBRATION",
    "DEFAULT_K",
    "DEFAULT_TEMPERATURE",
    "LOGO_NATIVE_MODES",
    "MAX_K",
    "ROUTING_MODES",
    "SPEC_USAGE",
    "TokenRouting",
    "is_routing_spec",
]
