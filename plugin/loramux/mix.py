"""A mix: which adapters a request uses and with what weights.

A mix ``{a: w_a, b: w_b}`` means the exact output-space sum of the adapters' deltas,
``y = W x + w_a * delta_a(x) + w_b * delta_b(x)``, which is what llama.cpp computes when
several adapters are set on a context with those scales. The empty mix is the base model.

A mix may instead route per token (:mod:`loramux.token_routing`): ``Mix.arrow()``,
``Mix.spectr()``, ``Mix.logo_token()``, ``Mix.parse("arrow:k=2,T=0.5")``, ``Mix.parse("logo-token:k=3,cal=spectral")``. Such a mix has no fixed weights (``len``
0, ``to_dict()`` ``{}``): each token picks its own top-k among every adapter registered on the
pool, inside the graph. It is never the base model (``bool(mix)`` is True, ``is_base`` False);
:meth:`Mix.to_json` and ``str`` show its mode, and equality and hashing include it, so K/V
computed under one routing is never reused under another mix.

Parsing (``"name=w,name=w"``), validation and the bounds live here, once, and every
caller (the pool, the CLI, ``loramux eval``, routers) goes through :class:`Mix`.

Bounds (documented, enforced on construction):

- names are non-empty and contain none of ``=``, ``,`` or whitespace;
- weights are finite floats with ``abs(w) <= MAX_ABS_WEIGHT`` (4.0); negative weights are
  allowed (they subtract an adapter's delta);
- at most ``MAX_MIX_ADAPTERS`` (64) adapters with a non-zero weight;
- a zero weight is the same as leaving the adapter out: it is dropped from the canonical form;
- ``arrow`` and ``spectr`` are routing modes, not adapter names.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Iterator, Mapping, Union

from loramux.errors import MixError
from loramux.token_routing import ROUTING_MODES, SPEC_USAGE, TokenRouting, is_routing_spec

MAX_ABS_WEIGHT = 4.0
MAX_MIX_ADAPTERS = 64

_BAD_NAME = re.compile(r"[=,\s]")

MixLike = Union["Mix", Mapping[str, Any], str, None]


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise MixError(f"adapter name {name!r} in a mix must be a non-empty string")
    if _BAD_NAME.search(name):
        raise MixError(f"adapter name {name!r} in a mix must not contain '=', ',' or whitespace")
    if name in ROUTING_MODES:
        raise MixError(f"{name!r} is a routing mode ({SPEC_USAGE}), not an adapter name; load that adapter under another name")
    return name


def _check_weight(name: str, weight: Any) -> float:
    if isinstance(weight, bool):
        raise MixError(f"weight of {name!r} is a bool ({weight}); give a number")
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise MixError(f"weight of {name!r} is {weight!r}, not a number") from None
    if not math.isfinite(w):
        raise MixError(f"weight of {name!r} is {w}; weights must be finite")
    if abs(w) > MAX_ABS_WEIGHT:
        raise MixError(f"weight of {name!r} is {w}; weights must lie in [-{MAX_ABS_WEIGHT}, {MAX_ABS_WEIGHT}]")
    return w


class Mix(Mapping[str, float]):
    """An immutable, validated mapping ``adapter name -> weight`` (zero weights dropped, names sorted).

    ``Mix()`` is the base model. ``Mix({"a": 0.5, "b": 0.5})``, ``Mix.parse("a=0.5,b=0.5")``,
    ``Mix.uniform(names)`` and ``Mix.one_hot(name)`` build the others. ``Mix.arrow()``,
    ``Mix.spectr()`` (or ``Mix(token_routing=TokenRouting(...))``) route per token instead and hold
    no weights. Mixes compare equal when their non-zero weights and their routing are equal, and
    hash accordingly.
    """

    __slots__ = ("_items", "_routing")

    def __init__(
        self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None, /, *, token_routing: TokenRouting | None = None
    ) -> None:
        pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights or [])
        seen: dict[str, float] = {}
        for name, weight in pairs:
            name = _check_name(name)
            if name in seen:
                raise MixError(f"adapter {name!r} appears twice in the mix")
            seen[name] = _check_weight(name, weight)
        kept = tuple(sorted((n, w) for n, w in seen.items() if w != 0.0))
        if len(kept) > MAX_MIX_ADAPTERS:
            raise MixError(f"a mix may use at most {MAX_MIX_ADAPTERS} adapters with non-zero weight, got {len(kept)}")
        if token_routing is not None and not isinstance(token_routing, TokenRouting):
            raise MixError(f"token_routing must be a TokenRouting, got {type(token_routing).__name__}")
        if token_routing is not None and kept:
            raise MixError(f"a routed mix ({token_routing}) has no fixed weights, got {dict(kept)}: give one or the other")
        self._items: tuple[tuple[str, float], ...] = kept
        self._routing: TokenRouting | None = token_routing

    # --- construction helpers -------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Mix":
        """Parse ``"name=w,name=w"`` (spaces around items are ignored; ``""`` or ``"base"`` is the empty mix),
        or a routing mode: ``"arrow"``, ``"arrow:k=3,T=1"``, ``"spectr"``, ``"spectr:k=4"``, ``"logo-token:k=3,cal=none"``."""
        if not isinstance(text, str):
            raise MixError(f"a mix string must be text, got {type(text).__name__}")
        stripped = text.strip()
        if stripped in ("", "base", "none"):
            return cls()
        if is_routing_spec(stripped):
            return cls(token_routing=TokenRouting.parse(stripped))
        pairs = []
        for item in stripped.split(","):
            item = item.strip()
            if not item:
                raise MixError(f"empty item in mix {text!r}; write name=w,name=w")
            name, sep, value = item.partition("=")
            if item in ROUTING_MODES:
                raise MixError(f"routing mode {item!r} in {text!r} must be the whole mix ({SPEC_USAGE}): a routed mix has no fixed weights")
            if not sep:
                raise MixError(f"mix item {item!r} in {text!r} has no '='; write name=w (e.g. {item}=1.0), or a routing mode: {SPEC_USAGE}")
            try:
                weight = float(value.strip())
            except ValueError:
                raise MixError(f"weight {value.strip()!r} of {name.strip()!r} in mix {text!r} is not a number") from None
            pairs.append((name.strip(), weight))
        return cls(pairs)

    @classmethod
    def uniform(cls, names: Iterable[str]) -> "Mix":
        """Equal weights summing to 1 over ``names`` (the empty mix for no names)."""
        names = list(names)
        return cls({n: 1.0 / len(names) for n in names}) if names else cls()

    @classmethod
    def one_hot(cls, name: str, weight: float = 1.0) -> "Mix":
        """A single adapter at ``weight``."""
        return cls({name: weight})

    @classmethod
    def arrow(cls, k: int = 3, temperature: float = 1.0) -> "Mix":
        """Arrow per-token routing: each token's top-``k`` adapters by ``|x . v_e|``, weights ``softmax(s / temperature)``."""
        return cls(token_routing=TokenRouting("arrow", k, temperature))

    @classmethod
    def spectr(cls, k: int = 4) -> "Mix":
        """SpectR per-token routing: each token's top-``k`` adapters by ``||Q_e^T x|| / sqrt(r_e)``, weights ``1/k``."""
        return cls(token_routing=TokenRouting("spectr", k))

    @classmethod
    def logo_token(cls, k: int = 3, calibration: str = "spectral") -> "Mix":
        """LoGo per-token routing in the graph (spec ``logo-token:k=3,cal=spectral``): each token's top-``k`` adapters by
        ``||D_e x|| / c_e`` (``calibration`` "none": ``c_e = 1``, "spectral": ``||D_e||_2``, "frobenius":
        ``||D_e||_F``), weights ``s / sum(s)``. Not the LoGo prompt router (``--router logo``)."""
        return cls(token_routing=TokenRouting("logo-token", k, None, calibration))

    @classmethod
    def coerce(cls, value: MixLike) -> "Mix":
        """A Mix from a Mix, a mapping, a ``"name=w,..."`` or routing-mode string, or None (the base model).

        A mapping whose ``"mode"`` is a string is a routed mix in :meth:`to_json`'s form
        (``{"mode": "arrow", "k": 3, "temperature": 1.0}``); any other mapping is ``{name: weight}``."""
        if value is None:
            return cls()
        if isinstance(value, Mix):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            if isinstance(value.get("mode"), str):
                return cls(token_routing=TokenRouting.from_json(value))
            return cls(value)
        raise MixError(f"a mix must be a mapping name -> weight, a 'name=w,...' string or None, got {type(value).__name__}")

    # --- routing ----------------------------------------------------------------
    @property
    def token_routing(self) -> TokenRouting | None:
        """The per-token routing mode of a routed mix (Arrow, SpectR); None for a mix of fixed weights."""
        return self._routing

    # --- checks ---------------------------------------------------------------
    def check_known(self, known: Iterable[str]) -> "Mix":
        """Return self if every name is in ``known``; else raise MixError listing the known names.

        A routed mix names no adapter (it routes among all that are registered): always self."""
        known_set = set(known)
        unknown = [n for n, _ in self._items if n not in known_set]
        if unknown:
            listing = ", ".join(sorted(known_set)) if known_set else "(no adapters are loaded)"
            raise MixError(f"unknown adapter(s) {', '.join(map(repr, unknown))} in mix; known adapters: {listing}")
        return self

    # --- Mapping protocol -----------------------------------------------------
    def __getitem__(self, name: str) -> float:
        for n, w in self._items:
            if n == name:
                return w
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        """False only for the base model (a routed mix holds no weights but is not the base model)."""
        return not self.is_base

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mix):
            return self._items == other._items and self._routing == other._routing
        if isinstance(other, Mapping):
            try:
                return self == Mix.coerce(other)
            except MixError:
                return False
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._items, self._routing))

    @property
    def is_base(self) -> bool:
        """True for the empty mix (the base model); False for a routed mix."""
        return not self._items and self._routing is None

    def to_dict(self) -> dict[str, float]:
        """The fixed weights as a plain ``{name: weight}`` dict (``{}`` for the base model and for a routed mix)."""
        return dict(self._items)

    def to_json(self) -> dict[str, Any]:
        """What responses echo: ``{name: weight}``, or ``{"mode", "k", "temperature"}`` for a routed mix
        (:meth:`coerce` reads both back)."""
        return self._routing.to_json() if self._routing is not None else self.to_dict()

    def __str__(self) -> str:
        """The canonical spec, which :meth:`parse` reads back to an equal mix (``base``, ``a=0.5,b=0.5``, ``arrow:k=3,T=1``)."""
        if self._routing is not None:
            return str(self._routing)
        return ",".join(f"{n}={w!r}" for n, w in self._items) if self._items else "base"

    def __repr__(self) -> str:
        if self._routing is not None:
            return f"Mix(token_routing={self._routing!r})"
        return f"Mix({self.to_dict()!r})"


__all__ = ["MAX_ABS_WEIGHT", "MAX_MIX_ADAPTERS", "Mix", "MixLike", "TokenRouting"]
