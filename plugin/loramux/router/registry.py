"""The one registry of prompt routers: a spec string (``KIND`` or ``KIND:ARG``) -> a router.

Every part of loramux that lets a router choose the mix reads this registry: ``loramux eval
--mix SPEC``, ``loramux run --mix SPEC`` / ``--router SPEC``, ``loramux chat``, the Python API
(:func:`open_router`) and ``loramux serve --router SPEC`` (the server's ``model: "auto"``).

Built in (each imported only when used, so this module imports nothing heavy):

- ``router:PATH`` (or a bare ``PATH.onnx``): the trained ONNX router (:mod:`loramux.router.runtime`);
- ``retrieval:KEYS``: nearest adapters by cosine to the prompt's embedding, keys built by
  ``loramux router index`` (:mod:`loramux.router.retrieval`); options after the path:
  ``retrieval:KEYS,k=3,T=0.05`` or ``weights=uniform``;
- ``logo`` / ``logo:k=3,cal=spectral``: LoGo, the adapters' own output norms at one layer, from the graph
  (:mod:`loramux.router.logo`);
- ``pooled:arrow`` / ``pooled:spectr[:k=3]``: per-token routing run once over the prompt and pooled into a
  fixed top-k mix, no samples, no training (:mod:`loramux.router.pooled`);
- ``file:MIX.json``: one fixed mix read from a file (``loramux compose`` writes one).

A router is anything with ``adapters`` (the names it routes among), ``route(prompt) -> Routing``
and ``close()``. Register more with :func:`register_router`. ``arrow`` and ``spectr`` are not
routers but per-token routing modes of a mix (:mod:`loramux.token_routing`): no router takes
those prefixes, and :func:`is_router_spec` is False for them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from loramux.errors import MixError
from loramux.router.selection import Routing
from loramux.token_routing import ROUTING_MODES, is_routing_spec


class PromptRouter(Protocol):
    """What every router gives: the adapters it chooses among and a Routing per prompt."""

    @property
    def adapters(self) -> tuple[str, ...]: ...

    def route(self, prompt: str) -> Routing: ...

    def close(self) -> None: ...


RouterFactory = Callable[[str | None, Any], PromptRouter]  # (the text after "KIND:", the AdapterPool)


@dataclass(frozen=True)
class RouterKind:
    """One registered kind of router."""

    prefix: str
    factory: RouterFactory
    usage: str  # e.g. "retrieval:KEYS[,k=3,T=0.05]"
    summary: str
    data_free: bool = False  # reads nothing but the pool (no file): a server may open it from a request's spec


_KINDS: dict[str, RouterKind] = {}


def register_router(prefix: str, factory: RouterFactory, *, usage: str, summary: str, data_free: bool = False) -> None:
    """Register (or replace) the router kind ``prefix`` (``data_free``: it reads no file, only the pool)."""
    if not prefix or ":" in prefix or "=" in prefix:
        raise ValueError(f"a router prefix must be non-empty without ':' or '=', got {prefix!r}")
    if prefix in ROUTING_MODES:
        raise ValueError(f"{prefix!r} is a per-token routing mode of a mix (loramux.token_routing), not a router prefix")
    _KINDS[prefix] = RouterKind(prefix, factory, usage, summary, data_free)


def router_kinds() -> list[RouterKind]:
    """The registered kinds, by prefix."""
    return [_KINDS[k] for k in sorted(_KINDS)]


def _split(spec: str) -> tuple[str, str | None]:
    prefix, sep, arg = spec.partition(":")
    if prefix not in _KINDS and spec.endswith(".onnx"):
        return "router", spec
    return prefix, (arg if sep else None)


def is_router_spec(spec: str) -> bool:
    """Whether ``spec`` names a router (and not a mix like ``name=w,...`` or a routing mode like ``arrow``)."""
    return not is_routing_spec(str(spec)) and _split(str(spec))[0] in _KINDS


def is_data_free_router_spec(spec: Any) -> bool:
    """Whether ``spec`` names a router that reads no file (``pooled:arrow``, ``logo``): one a request may name."""
    return isinstance(spec, str) and is_router_spec(spec) and _KINDS[_split(spec)[0]].data_free


class RouterCache:
    """Routers opened by spec, each once, and closed together (a server's data-free routers)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._routers: dict[str, PromptRouter] = {}
        self._lock = threading.Lock()

    def get(self, spec: str) -> PromptRouter:
        """The router ``spec`` names, opened on first use (a MixError for a bad spec)."""
        with self._lock:
            if spec not in self._routers:
                self._routers[spec] = open_router(spec, self.pool)
            return self._routers[spec]

    def close(self) -> None:
        with self._lock:
            routers, self._routers = list(self._routers.values()), {}
        for router in routers:
            router.close()


def open_router(spec: str, pool: Any) -> PromptRouter:
    """The router ``spec`` names, checked against ``pool`` (its base model and adapters)."""
    prefix, arg = _split(str(spec))
    kind = _KINDS.get(prefix)
    if kind is None:
        known = ", ".join(k.usage for k in router_kinds())
        raise MixError(f"unknown router {spec!r}; known: {known}")
    return kind.factory(arg, pool)


# --- built-in kinds ---------------------------------------------------------------------


def _need_arg(kind: str, arg: str | None, what: str) -> str:
    if not arg:
        raise MixError(f"router {kind!r} needs {what}: {kind}:{what.upper()}")
    return arg


def _onnx(arg: str | None, pool: Any) -> PromptRouter:
    """The trained router, checked against the pool's base model; every adapter it routes to must be loaded
    (the pool may hold more, e.g. adapters loaded after training, which it never picks)."""
    from loramux.router.errors import RouterMismatchError
    from loramux.router.runtime import Router

    path = _need_arg("router", arg, "path")
    router = Router.load(path, base=pool.base_path)
    missing = sorted(set(router.adapters) - set(pool.names))
    if missing:
        router.close()
        raise RouterMismatchError(
            f"router {path} routes to adapters that are not loaded: {', '.join(missing)}; load them, or retrain the router on this pool"
        )
    return router


def _retrieval(arg: str | None, pool: Any) -> PromptRouter:
    from loramux.router.retrieval import RetrievalRouter

    path, _, options = _need_arg("retrieval", arg, "keys").partition(",")
    return RetrievalRouter.load(path, pool=pool, options=options)


def _logo(arg: str | None, pool: Any) -> PromptRouter:
    from loramux.router.logo import LogoRouter

    return LogoRouter(pool, options=arg)


def _pooled(arg: str | None, pool: Any) -> PromptRouter:
    from loramux.router.pooled import PooledRouter

    return PooledRouter(pool, spec=arg)


def _file(arg: str | None, pool: Any) -> PromptRouter:
    from loramux.router.fixed import FixedMixRouter

    return FixedMixRouter.load(Path(_need_arg("file", arg, "path")), pool=pool)


register_router("router", _onnx, usage="router:PATH.onnx", summary="a trained ONNX router (loramux router train)")
register_router(
    "retrieval",
    _retrieval,
    usage="retrieval:KEYS[,k=3,T=0.05,weights=softmax|uniform]",
    summary="nearest adapters to the prompt's embedding (keys: loramux router index)",
)
register_router(
    "logo",
    _logo,
    usage="logo[:k=3,cal=none|spectral|frobenius,layer=-1,module=attn_q]",
    summary="LoGo: the adapters' own output norms at one layer, read from the graph, no training, no samples",
    data_free=True,
)
register_router(
    "pooled",
    _pooled,
    usage="pooled:arrow|spectr[:k=3,weights=share|uniform]",
    summary="per-token routing (Arrow, SpectR) over the prompt once, pooled into a fixed top-k mix: no samples, no training",
    data_free=True,
)
register_router("file", _file, usage="file:MIX.json", summary="one fixed mix read from a file (loramux compose)")


__all__ = [
    "RouterCache",
    "is_data_free_router_spec",
    "PromptRouter",
    "RouterFactory",
    "RouterKind",
    "is_router_spec",
    "open_router",
    "register_router",
    "router_kinds",
]
