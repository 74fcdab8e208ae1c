"""Router options in a spec string: ``k=3,T=0.05`` after the router's prefix (typed like the defaults)."""

from __future__ import annotations

from typing import Any

from loramux.errors import MixError


def parse_options(text: str | None, defaults: dict[str, Any], *, source: str) -> dict[str, Any]:
    """``k=3,T=0.5`` -> a copy of ``defaults`` with those keys replaced, typed like the defaults."""
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise MixError(f"{source}: unknown option {item!r}; options: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
        kind = type(defaults[key])
        try:
            out[key] = kind(value)
        except ValueError as exc:
            raise MixError(f"{source}: option {key} wants a {kind.__name__}, got {value!r}") from exc
    return out


__all__ = ["parse_options"]
