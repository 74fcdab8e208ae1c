"""Which mix a request runs under, from its body, in order:

1. ``mix``: ``{adapter name: weight}``, ``"name=w,..."``, a per-token routing mode (``"arrow"``,
   ``"arrow:k=3,T=1"``, ``"spectr"``, or ``{"mode": "arrow", "k": 3, "temperature": 1.0}``), or a
   router that reads no file (``"pooled:arrow"``, ``"pooled:spectr:k=2"``, ``"logo"``: it picks the
   mix from the prompt, as ``auto`` does; :func:`loramux.router.registry.is_data_free_router_spec`);
2. ``lora``: ``[{"id": i, "scale": s}, ...]``, llama-server's field, with the ids that
   ``GET /lora-adapters`` lists (adapters not named get scale 0), so llama-server clients work unchanged;
3. ``model``: ``"auto"`` (the router picks the mix from the prompt), a routing mode (``"arrow"``,
   ``"arrow:k=2,T=0.5"``, ``"spectr"``, ...: every token routed among all adapters), a router that
   reads no file (as in ``mix``), an adapter
   name (that adapter at weight 1), a named mix of the config, or the base model (its id, or omitted).
   A ``model`` naming none of these is answered as if no model were given (``mix_source`` ``"unknown_model"``
   and the header ``X-Loramux-Unknown-Model``), as llama-server ignores the name; with
   ``--unknown-model error`` it is a 404 listing the known names (vLLM's answer).

Without any of them, the default scales set with ``POST /lora-adapters`` (none: the base model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from loramux.errors import MixError
from loramux.mix import Mix
from loramux.router.registry import is_data_free_router_spec
from loramux.server.errors import APIError, model_not_found
from loramux.token_routing import is_routing_spec

AUTO = "auto"


@dataclass
class LoraTable:
    """llama-server's adapter ids: an index per adapter, kept for its lifetime (append-only)."""

    names: list[str | None] = field(default_factory=list)
    default_scales: dict[str, float] = field(default_factory=dict)

    def add(self, name: str) -> int:
        if name in self.names:
            return self.names.index(name)
        self.names.append(name)
        return len(self.names) - 1

    def remove(self, name: str) -> None:
        if name in self.names:
            self.names[self.names.index(name)] = None
        self.default_scales.pop(name, None)

    def mix_of(self, entries: Any, *, field_name: str = "lora") -> Mix:
        if not isinstance(entries, list):
            raise APIError(400, f'{field_name} must be a list of {{"id": int, "scale": float}}', param=field_name)
        weights: dict[str, float] = {}
        for e in entries:
            if not isinstance(e, Mapping) or not isinstance(e.get("id"), int) or isinstance(e.get("id"), bool):
                raise APIError(400, f'{field_name} entries are {{"id": int, "scale": float}}, got {e!r}', param=field_name)
            i = e["id"]
            if not 0 <= i < len(self.names) or self.names[i] is None:
                known = ", ".join(f"{j}={n}" for j, n in enumerate(self.names) if n is not None)
                raise APIError(400, f"{field_name}: no adapter with id {i} (GET /lora-adapters lists them: {known})", param=field_name)
            weights[self.names[i]] = e.get("scale", 1.0)
        try:
            return Mix(weights)
        except MixError as exc:
            raise APIError(400, str(exc), param=field_name, code="invalid_mix") from None

    def listing(self, paths: Mapping[str, str]) -> list[dict[str, Any]]:
        return [
            {"id": i, "path": paths.get(n, n), "scale": self.default_scales.get(n, 0.0)} for i, n in enumerate(self.names) if n is not None
        ]


@dataclass
class Selection:
    """The mix a request runs under, where it came from, and the router's decision for ``auto``."""

    mix: Mix
    source: str  # "mix" | "lora" | "auto" | "router" | "routed" | "adapter" | "named" | "base" | "default" | "unknown_model"
    routing: dict[str, Any] | None = None


@dataclass
class MixSelector:
    """Resolves the mix of a request body (see the module docstring). ``routing_modes``: the routing
    modes ``/v1/models`` lists (those this server can run; a routed ``model`` is parsed either way)."""

    model_id: str
    adapters: Callable[[], Sequence[str]]
    mixes: Mapping[str, Mix]
    lora: LoraTable
    route: Callable[[str], Any] | None = None  # prompt -> Routing (``.mix``, ``.to_json()``)
    base_names: tuple[str, ...] = ()
    routing_modes: tuple[str, ...] = ()
    unknown_model: str = "base"  # "base": an unknown name runs the base model; "error": 404
    spec_router: Callable[[str], Any] | None = None  # a data-free router's spec -> the router (None: no model here)
    router_specs: tuple[str, ...] = ()  # the data-free router specs /v1/models lists

    def models(self) -> list[str]:
        """The ids ``/v1/models`` lists: the base model, auto, named mixes, adapters, then the routing modes."""
        adapters = sorted(self.adapters())
        routed = list(self.routing_modes) if adapters else []  # routing needs adapters to route among
        routers = list(self.router_specs) if adapters and self.spec_router else []
        names = [self.model_id] + ([AUTO] if self.route else []) + sorted(self.mixes) + adapters + routed + routers
        return list(dict.fromkeys(names))

    def select(self, body: Mapping[str, Any], prompt_text: Callable[[], str]) -> Selection:
        """The mix of ``body`` and where it came from; a 400/404 APIError naming the field when it has none."""
        if is_data_free_router_spec(body.get("mix")):
            return self._by_router(body["mix"], "mix", prompt_text)
        if body.get("mix") is not None:
            try:
                return Selection(Mix.coerce(body["mix"]), "mix")
            except (MixError, TypeError, ValueError) as exc:
                raise APIError(400, f"mix: {exc}", param="mix", code="invalid_mix") from None
        if body.get("lora") is not None:
            return Selection(self.lora.mix_of(body["lora"]), "lora")
        model = body.get("model")
        if model in (None, "", self.model_id, *self.base_names):
            return self._default()
        if not isinstance(model, str):
            raise APIError(400, "model must be a string", param="model")
        if model == AUTO:
            if self.route is None:
                raise APIError(
                    400, 'model "auto" needs a router: start the server with --router FILE', param="model", code="model_not_found"
                )
            routing = self.route(prompt_text())
            return Selection(routing.mix, "auto", routing.to_json())
        if is_routing_spec(model):
            try:
                return Selection(Mix.parse(model), "routed")
            except MixError as exc:
                raise APIError(400, f"model: {exc}", param="model", code="invalid_mix") from None
        if model in self.mixes:
            return Selection(self.mixes[model], "named")
        if model in self.adapters():
            return Selection(Mix({model: 1.0}), "adapter")
        if is_data_free_router_spec(model):
            return self._by_router(model, "model", prompt_text)
        if self.unknown_model == "base":  # as no model at all (llama-server ignores the name)
            return Selection(self._default().mix, "unknown_model")
        raise model_not_found(model, self.models())

    def _by_router(self, spec: str, field_name: str, prompt_text: Callable[[], str]) -> Selection:
        """The mix the router ``spec`` (one that reads no file) picks for the prompt."""
        if self.spec_router is None:
            raise APIError(
                400, f"{field_name}: router {spec!r} needs the model in this process (loramux serve --adapters)", param=field_name
            )
        try:
            routing = self.spec_router(spec).route(prompt_text())
        except MixError as exc:
            raise APIError(400, f"{field_name}: {exc}", param=field_name, code="invalid_mix") from None
        return Selection(routing.mix, "router", routing.to_json())

    def _default(self) -> Selection:
        """The base model, or the default scales of ``POST /lora-adapters`` when set."""
        return Selection(Mix(self.lora.default_scales), "default" if self.lora.default_scales else "base")


__all__ = ["AUTO", "LoraTable", "MixSelector", "Selection"]
