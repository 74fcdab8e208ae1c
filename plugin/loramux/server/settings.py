"""Settings of ``loramux serve``: from a config file (TOML or JSON) and from flags (flags win).

A config file holds the same keys as the flags, with underscores, plus named mixes::

    base = "models/smollm2.gguf"
    adapters = ["adapters/"]          # directories (or files) loaded at start; the only places
                                      # the adapter-management endpoint may load from
    router = "router.onnx"            # model "auto" (optional)
    n_seq_max = 8
    n_ctx = 2048
    max_queue = 64
    max_active = 4                    # adapters of one mix per sequence; the top-k limit of arrow/spectr
    [mixes]                           # named mixes, usable as the "model" of a request
    logic = { boolean_expressions = 0.7, formal_fallacies = 0.3 }

Relative paths in a config file are relative to the file's folder.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from loramux.errors import LoramuxError
from loramux.mix import Mix
from loramux.token_routing import DEFAULT_K, ROUTING_MODES

PATH_KEYS = ("base",)
UNKNOWN_MODEL_POLICIES = ("base", "error")
AFFINITY_MODES = ("set", "top", "none")  # --ray's affinity keys (loramux.ray.affinity says what each is)


class SettingsError(LoramuxError, ValueError):
    """The server's settings are inconsistent or a config file cannot be read (the message says which)."""


@dataclass
class ServeSettings:
    """Everything ``loramux serve`` is started with."""

    base: Path | None = None
    adapters: list[Path] = field(default_factory=list)
    mixes: dict[str, Mix] = field(default_factory=dict)
    router: str | None = None  # a router spec of loramux.router.registry (a bare .onnx path too)
    upstream: str | None = None
    llama_server: bool = False  # serve the adapters through loramux's patched llama-server (a child) and the hook
    ray: bool = False  # serve on Ray Serve: an ingress and --replicas engine replicas, routed by adapter-set affinity
    replicas: int = 2  # engine replicas of --ray
    max_adapter_sets: int = 8  # affinity keys each --ray replica keeps loaded (Serve's max_num_models_per_replica)
    affinity: str = "set"  # the --ray affinity key: "set" (hash of the adapter set), "top" (the heaviest adapter), "none"
    host: str = "127.0.0.1"  # one address, or several separated by commas (llama-server's --host a,b)
    port: int = 8080
    api_key: str | None = None
    n_seq_max: int = 8
    n_ctx: int = 2048
    threads: int | None = None
    max_queue: int = 64
    max_active: int = max(3, *DEFAULT_K.values())  # 4: model "spectr" (top-4) runs as listed; AdapterPool's default is 3
    skip_embeddings: bool = False
    flash_attn: bool = True  # llama-server's default (auto: on where supported); the library's is off
    model_id: str = "loramux"
    unknown_model: str = "base"  # a "model" naming nothing: "base" (llama-server's answer) or "error" (404, vLLM's)
    cors: list[str] = field(default_factory=list)  # origins allowed by CORS ("*": any); none: no CORS headers
    n_predict: int | None = None  # max_tokens of a request that gives none (llama-server's --n-predict)
    temperature: float | None = None  # the temperature of a request that gives none (llama-server's --temp)
    seed: int | None = None  # the seed of requests sampled without one
    aliases: list[str] = field(default_factory=list)  # more names of the base model (llama-server's --alias a,b)
    tags: list[str] = field(default_factory=list)  # the base model's tags in /models (llama-server's --tags)
    slots: bool = False  # GET /slots answers (llama-server's --slots); else 501
    verbose: bool = False  # every answer carries "__verbose" (the prompt as read), as llama-server's --verbose
    chat_template: str | None = None  # a Jinja chat template used instead of the base model's
    webui: bool = True  # the playground page at / (--no-webui: off, as llama-server's flag)

    @property
    def hosts(self) -> list[str]:
        """The addresses to listen on."""
        return [h.strip() for h in self.host.split(",") if h.strip()]

    def check(self) -> "ServeSettings":
        if not self.hosts:
            raise SettingsError(f"--host {self.host!r} names no address")
        for host in self.hosts:
            if not self.api_key and not is_loopback(host):
                raise SettingsError(
                    f"--host {host} is not a loopback address: without --api-key the server listens on "
                    "loopback only (give --api-key KEY to serve other machines)"
                )
        if not 0 <= self.port < 65536:
            raise SettingsError(f"--port {self.port} is not a port number")
        if self.chat_template is not None and "{" not in self.chat_template:
            raise SettingsError(
                f"--chat-template {self.chat_template!r} is not a Jinja template: loramux renders Jinja templates only "
                "(llama.cpp's built-in named templates are C++); give the template's text or --chat-template-file FILE"
            )
        if self.unknown_model not in UNKNOWN_MODEL_POLICIES:
            raise SettingsError(f"--unknown-model {self.unknown_model!r}: choose one of {', '.join(UNKNOWN_MODEL_POLICIES)}")
        if self.n_predict is not None and self.n_predict < -1:
            raise SettingsError(f"--n-predict {self.n_predict}: give a number of tokens, or -1 for no limit")
        if self.llama_server and not self.adapters:
            raise SettingsError("--llama-server serves --adapters: give --adapters DIR")
        if self.llama_server and self.upstream is not None:
            raise SettingsError("--llama-server starts its own llama-server: give it --adapters, not --upstream")
        for name in self.mixes:
            if name in ("auto", self.model_id, *ROUTING_MODES):
                raise SettingsError(f"a named mix cannot be called {name!r} (reserved model name)")
        if self.ray:
            self._check_ray()
        if self.max_active < 1:
            raise SettingsError(f"--max-active {self.max_active} must be at least 1")
        return self

    def _check_ray(self) -> None:
        if self.upstream is not None or self.llama_server:
            raise SettingsError("--ray runs loramux engines as Ray Serve replicas: give it --adapters, not --upstream or --llama-server")
        if self.replicas < 1:
            raise SettingsError(f"--replicas {self.replicas} must be at least 1")
        if self.max_adapter_sets < 1:
            raise SettingsError(f"--max-adapter-sets {self.max_adapter_sets} must be at least 1")
        if self.affinity not in AFFINITY_MODES:
            raise SettingsError(
                f"--affinity {self.affinity!r}: choose set (a hash of the adapter set), top (the heaviest adapter) or none (no affinity)"
            )
        if len(self.hosts) != 1:
            raise SettingsError(f"--ray listens on one address (Ray Serve's HTTP proxy), got --host {self.host}")

    def adapter_dirs(self) -> list[Path]:
        """The folders the adapter-management endpoint may load from (resolved, symlinks followed)."""
        return [(p if p.is_dir() else p.parent).resolve() for p in self.adapters]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(ai[4][0]).is_loopback for ai in socket.getaddrinfo(host, None))
        except OSError:
            return False


def read_config(path: Path) -> dict[str, Any]:
    """The settings a config file gives (TOML, or JSON for a .json file)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read the config file {path}: {exc}") from exc
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import tomllib

            raw = tomllib.loads(text)
    except Exception as exc:
        raise SettingsError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    known = {f.name for f in fields(ServeSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SettingsError(f"config file {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return _resolve_paths(raw, path.parent)


def _resolve_router(spec: str, root: Path) -> str:
    """A router spec with its file path made relative to the config's folder (``logo`` has none)."""
    from loramux.router.registry import is_router_spec

    prefix, sep, rest = spec.partition(":")
    if not is_router_spec(spec) or not sep:
        return str(root / spec) if not is_router_spec(spec) else spec
    if prefix == "logo" or (not rest):
        return spec
    path, comma, options = rest.partition(",")
    return f"{prefix}:{root / path}{comma}{options}"


def _resolve_paths(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    out = dict(raw)
    for key in PATH_KEYS:
        if out.get(key) is not None:
            out[key] = root / Path(out[key])
    if out.get("router") is not None:
        out["router"] = _resolve_router(str(out["router"]), root)
    if "adapters" in out:
        items = out["adapters"] if isinstance(out["adapters"], list) else [out["adapters"]]
        out["adapters"] = [root / Path(p) for p in items]
    if "mixes" in out:
        if not isinstance(out["mixes"], Mapping):
            raise SettingsError("config key 'mixes' must be a table of {name = {adapter = weight, ...}}")
        out["mixes"] = {str(n): Mix(dict(m)) for n, m in out["mixes"].items()}
    return out


def merge(config: Mapping[str, Any], flags: Mapping[str, Any]) -> ServeSettings:
    """Settings from a config file's values overridden by the flags that were given (not None / empty)."""
    values = dict(config)
    for key, value in flags.items():
        if value is not None and value != []:
            values[key] = value
    return ServeSettings(**values).check()


__all__ = ["UNKNOWN_MODEL_POLICIES", "ServeSettings", "SettingsError", "is_loopback", "merge", "read_config"]
