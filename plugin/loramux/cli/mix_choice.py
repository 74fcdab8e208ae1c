"""``--mix`` of run and chat: a fixed mix (``name=w,...``), a per-token routing mode (``arrow``, ``spectr``,
``logo-token``) or any router of the registry (``retrieval:KEYS``, ``logo``, ...)."""

from __future__ import annotations

from typing import Any

from loramux.mix import MAX_ABS_WEIGHT, MAX_MIX_ADAPTERS, Mix
from loramux.router.registry import is_router_spec, open_router, router_kinds
from loramux.router.selection import Routing
from loramux.token_routing import DEFAULT_K


def mix_help() -> str:
    """The ``--mix`` syntax, for --help texts."""
    routers = "; ".join(f"{k.usage} ({k.summary})" for k in router_kinds())
    return (
        f"a mix name=w,name=w (adapter names, finite |w| <= {MAX_ABS_WEIGHT:g}, at most {MAX_MIX_ADAPTERS} adapters), "
        f"'base', a per-token routing mode that lets every token pick its own top-k of all loaded adapters at every "
        f"adapted weight (native library; k <= --max-active): arrow[:k={DEFAULT_K['arrow']},T=1] (Arrow: each adapter's top "
        f"singular direction, softmax weights at temperature T), spectr[:k={DEFAULT_K['spectr']}] (SpectR: the token's "
        f"projection on the adapter's row space, per rank; uniform weights) or logo-token[:k={DEFAULT_K['logo-token']},"
        f"cal=none|spectral|frobenius] (LoGo: the norm of each adapter's own output, over 1, its spectral or its "
        f"Frobenius norm; weights in proportion; not on the device form), or a router that picks the mix of each prompt: {routers}"
    )


class MixChoice:
    """A fixed or routed mix (``arrow``, ``spectr``), or a router that chooses one per prompt. Close it when done."""

    def __init__(self, pool: Any, text: str | None) -> None:
        text = (text or "").strip()
        self.spec = text or "base"
        self.router = open_router(text, pool) if text and is_router_spec(text) else None
        self.mix = Mix() if self.router is not None or text in ("", "base") else pool.resolve_mix(Mix.parse(text))
        pool.path_for(self.mix)  # a routed mix this pool cannot run (no native library, k > max_active) is refused now
        self._pool = pool

    def for_prompt(self, prompt: str) -> tuple[Mix, Routing | None]:
        """The mix for ``prompt`` and, when a router chose it, the router's Routing."""
        if self.router is None:
            return self.mix, None
        routing = self.router.route(prompt)
        return self._pool.resolve_mix(routing.mix), routing

    def close(self) -> None:
        if self.router is not None:
            self.router.close()
            self.router = None

    def __str__(self) -> str:
        return self.spec if self.router is not None else str(self.mix)


def routing_note(routing: Routing | None, mix: Mix) -> str:
    """One line for stderr: the mix, and what the router saw."""
    if routing is None:
        return f"[mix: {mix}]"
    fallback = f", fallback {routing.fallback}" if routing.fallback else ""
    return f"[routed mix: {mix} (top {routing.top1}, {routing.confidence:.3f}{fallback})]"


__all__ = ["MixChoice", "mix_help", "routing_note"]
