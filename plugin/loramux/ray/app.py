"""Build the Serve application (ingress, engine replicas, metrics board) and run it locally.

``loramux serve --ray --replicas N`` starts a local Ray (``ray.init()``) and runs it;
``serve run loramux.ray.app:from_args config=serve.toml replicas=4`` (or a Serve config YAML with
``import_path: loramux.ray.app:from_args`` and ``args:``) runs it on an existing cluster.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from loramux.errors import LoramuxError
from loramux.server.settings import ServeSettings, SettingsError

APP_NAME = "loramux"
OBJECT_STORE_BYTES = 256 * 2**20  # a local Ray's object store: requests and answers are small (Ray's default: 30% of memory)


@dataclass
class RayOptions:
    """How the application is laid out on Ray: replicas, their CPUs, and the affinity key."""

    replicas: int = 2
    max_sets: int = 8  # affinity keys (adapter sets) each replica keeps loaded: Serve's max_num_models_per_replica
    affinity: str = "set"  # "set" (hash of the adapter set) or "top" (the heaviest adapter): loramux.ray.affinity
    engine_cpus: float = 1.0  # Ray's num_cpus of one engine replica (the engine's threads are --threads)
    ingress_cpus: float = 0.5
    ingress_replicas: int = 1

    @classmethod
    def of(cls, settings: ServeSettings, **more: Any) -> "RayOptions":
        return cls(replicas=settings.replicas, max_sets=settings.max_adapter_sets, affinity=settings.affinity, **more)


def require_ray() -> None:
    """Raise a clear error when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise LoramuxError("--ray needs Ray Serve: pip install 'loramux[ray]'") from None


def build_app(settings: ServeSettings, options: RayOptions):
    """The Serve application: ingress -> engine replicas (multiplexed by affinity key), and the metrics board."""
    require_ray()
    from ray import serve

    from loramux.ray.adapter_sets import adapter_sources
    from loramux.ray.engine import EngineReplica
    from loramux.ray.ingress import Ingress
    from loramux.ray.metrics import Board

    sources = adapter_sources(settings.adapters)
    board = serve.deployment(Board, name="LoramuxMetricsBoard", ray_actor_options={"num_cpus": 0}).bind()
    engine = serve.deployment(
        EngineReplica,
        name="LoramuxEngine",
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.engine_cpus},
        max_ongoing_requests=settings.n_seq_max + settings.max_queue,
        health_check_period_s=2,
        health_check_timeout_s=30,
    ).bind(settings, sources, options.max_sets, board)
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="LoramuxIngress",
        num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": options.ingress_cpus},
        max_ongoing_requests=10_000,
    )
    return ingress.bind(settings, sorted(sources), engine, board, options.affinity)


def from_args(args: Mapping[str, Any]):
    """The application for ``serve run`` / a Serve config: ``config`` (a loramux serve TOML/JSON file),
    and the options ``replicas``, ``max_adapter_sets``, ``affinity``, ``engine_cpus``, ``ingress_cpus``, ``ingress_replicas``."""
    from loramux.server.settings import merge, read_config

    known = {"config", "replicas", "max_adapter_sets", "affinity", "engine_cpus", "ingress_cpus", "ingress_replicas"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise SettingsError(f"loramux.ray.app:from_args: unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    config = read_config(Path(args["config"])) if args.get("config") else {}
    flags = {k: type_of(k)(args[k]) for k in ("replicas", "max_adapter_sets", "affinity") if k in args}
    settings = merge(config, flags | {"ray": True})
    layout = {k: float(args[k]) for k in ("engine_cpus", "ingress_cpus") if k in args}
    if "ingress_replicas" in args:
        layout["ingress_replicas"] = int(args["ingress_replicas"])
    return build_app(settings, RayOptions.of(settings, **layout))


def type_of(key: str):
    return str if key == "affinity" else int


# Ray Serve's proxy checks (defaults 5 s ready, 10 s health; 3 misses and the proxy is killed, which ends
# `loramux serve --ray` at start): longer on a local Ray, where the proxy shares a few cores with the engines
SLOW_START_TIMEOUTS_S = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": 60, "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": 60}


def run_local(settings: ServeSettings) -> None:
    """``loramux serve --ray``: a local Ray (or the cluster of ``RAY_ADDRESS``), the app on
    ``--host``/``--port``, until SIGINT / SIGTERM."""
    require_ray()
    import signal
    import threading

    import ray
    from ray import serve

    local = not os.environ.get("RAY_ADDRESS")
    if local:  # Ray Serve reads these in the processes ray.init starts: a busy small machine starts its proxy slowly
        for name, seconds in SLOW_START_TIMEOUTS_S.items():
            os.environ.setdefault(name, str(seconds))
    cpus = max(os.cpu_count() or 1, settings.replicas + 1)  # logical CPUs: every replica gets one
    own = {"num_cpus": cpus, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES}
    context = ray.init(**(own if local else {}), log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    where = context.address_info.get("gcs_address", "?")
    print(f"loramux serve --ray: starting {settings.replicas} engine replicas (Ray at {where})", file=sys.stderr, flush=True)
    try:
        serve.start(http_options={"host": settings.hosts[0], "port": settings.port})
        serve.run(build_app(settings, RayOptions.of(settings)), name=APP_NAME, route_prefix="/")
        print(f"loramux serve: listening on http://{settings.hosts[0]}:{settings.port}", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


__all__ = ["APP_NAME", "RayOptions", "build_app", "from_args", "require_ray", "run_local"]
