"""``file:MIX.json``: one fixed mix read from a file, as a router (``loramux compose`` writes such files).

The file is a JSON object with a ``"mix"`` object ``{adapter: weight}`` (other keys, e.g. how the
mix was found, are kept in :attr:`FixedMixRouter.info`), or the ``{adapter: weight}`` object alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramux.errors import MixError
from loramux.mix import Mix
from loramux.router.selection import Routing


class FixedMixRouter:
    """Every prompt gets the same mix."""

    def __init__(self, mix: Mix, *, source: str, info: dict[str, Any] | None = None) -> None:
        self.mix = mix
        self.source = source
        self.info = dict(info or {})

    @classmethod
    def load(cls, path: Path, *, pool: Any = None) -> "FixedMixRouter":
        """Read ``path``; with ``pool``, every adapter of the mix must be loaded there."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MixError(f"mix file {path} does not exist (loramux compose -o {path} writes one)") from None
        except (OSError, ValueError) as exc:
            raise MixError(f"mix file {path} is not readable JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise MixError(f"mix file {path} must hold a JSON object, got {type(data).__name__}")
        weights = data.get("mix", data)
        try:
            mix = Mix(weights)
        except (MixError, TypeError, ValueError) as exc:
            raise MixError(f"mix file {path}: {exc}") from exc
        if pool is not None:
            mix = pool.resolve_mix(mix)
        info = {k: v for k, v in data.items() if k != "mix"} if "mix" in data else {}
        return cls(mix, source=str(path), info=info)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.mix)

    def route(self, prompt: str) -> Routing:
        top = max(self.mix, key=lambda n: abs(self.mix[n])) if self.mix else "(base)"
        return Routing(self.mix, self.mix.to_dict(), None, top, abs(self.mix[top]) if self.mix else 0.0)

    def close(self) -> None:
        pass


__all__ = ["FixedMixRouter"]
