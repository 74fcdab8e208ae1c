"""loramux serve: an OpenAI-compatible HTTP server, every request under its own mix, batched."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loramux.errors import LoramuxError

EPILOG = """\
The mix of a request comes from, in order: the body field "mix" ({"adapter": weight}); llama-server's
"lora" field ([{"id": i, "scale": s}] with the ids GET /lora-adapters lists); the "model" field:
"auto" (the --router picks the mix from the prompt), an adapter name, a named mix of the config
file, or the base model. Every response says which mix was used ("mix"; for auto also "routing").

Per-token routing: "mix" or "model" "arrow" / "arrow:k=3,T=1" (Arrow) or "spectr" / "spectr:k=4"
(SpectR): every token picks its own top-k of all loaded adapters at every adapted weight, inside
the graph (native library; k <= --max-active). The response's "mix" is then {"mode", "k",
"temperature"}. In front of a stock llama-server (--upstream) routing answers 400; in front of
loramux's patched llama-server (--llama-server, or --upstream to one) it is forwarded.

Which server when (docs/serve.md): this Python server for the Python API, adapters loaded while
serving, and the LoGo / retrieval routers; --llama-server (loramux's patched llama-server, C++,
with this router in front) for throughput; --upstream for a llama-server you already run.

A "model" naming nothing here is answered as if none were given (header X-Loramux-Unknown-Model),
as llama-server does; --unknown-model error answers 404, as vLLM does.

Playground: open http://127.0.0.1:8080/ in a browser: up to four mixes answer one prompt side by side
(docs/playground.md); --no-webui turns the page off.

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics,
/v1/adapters (GET list, POST {"path"} load, DELETE /v1/adapters/NAME unload),
/v1/routing/tokens (per token, the adapter an arrow/spectr mix chose), and llama-server's:
/completion, /completions, /chat/completions, /models, /tokenize, /detokenize, /apply-template,
/props, /slots (--slots), /lora-adapters. Tools, response_format, logprobs, n, assistant prefill
and llama-server's request fields: docs/serve.md says what each does, and what is refused.

Examples:
  loramux serve --adapters adapters/ --port 8080
  loramux serve --host 127.0.0.1,::1 --cors http://localhost:5173   # no adapters yet; a browser app may call it
  curl -s localhost:8080/v1/chat/completions -d '{"model": "boolean_expressions",
       "messages": [{"role": "user", "content": "not ( True ) and True is"}]}'
  loramux serve --adapters adapters/ --llama-server --router router.onnx   # patched llama-server + router
  loramux serve --upstream http://127.0.0.1:8081 --router router.onnx   # route for a running llama-server
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server: per-request adapter mixes, batched",
        description="Serve the base model and its adapters over HTTP (OpenAI and llama-server shapes). "
        "Requests with different mixes decode together in one batch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help="a TOML (or .json) file with these settings and named mixes")
    p.add_argument("--base", type=Path, default=None, help="base model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument(
        "--adapters",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of adapters (GGUF files, PEFT folders), or one adapter; repeatable. Adapters can be "
        "loaded later from these folders only",
    )
    p.add_argument(
        "--router",
        default=None,
        metavar="ROUTER",
        help='the router of model "auto": a trained router .onnx, retrieval:KEYS, logo, file:MIX.json '
        "(see loramux run --help); with --upstream only a trained .onnx router",
    )
    p.add_argument(
        "--upstream", default=None, metavar="URL", help="route for a running stock llama-server at URL instead of serving a model here"
    )
    p.add_argument(
        "--llama-server",
        action="store_true",
        default=None,
        help="serve --adapters through loramux's patched llama-server (built once: loramux llama-server build), "
        "started here as a child on loopback with this router in front; stopped with this command",
    )
    _engine_options(p)
    _client_options(p)
    _ray_options(p)
    p.set_defaults(run=run)


def _ray_options(p: argparse.ArgumentParser) -> None:
    """Ray Serve: replicas of the engine, requests routed by adapter-set affinity (docs/scale.md)."""
    p.add_argument(
        "--ray",
        action="store_true",
        default=None,
        help="serve on Ray Serve (local Ray, or the cluster of RAY_ADDRESS): an ingress and --replicas engine replicas, "
        "each request sent to a replica that holds its adapter set (needs pip install 'loramux[ray]')",
    )
    p.add_argument("--replicas", type=int, default=None, help="engine replicas of --ray (default: 2)")
    p.add_argument(
        "--max-adapter-sets", type=int, default=None, help="adapter sets (affinity keys) each --ray replica keeps loaded (default: 8)"
    )
    p.add_argument(
        "--affinity",
        choices=("set", "top", "none"),
        default=None,
        help="the --ray affinity key: set (a hash of the mix's adapter set, the default), top (its heaviest adapter: fewer keys), "
        "or none (no affinity: Serve's default routing, the baseline)",
    )


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default=None,
        help="address(es) to listen on, comma-separated (default: 127.0.0.1; non-loopback ones need --api-key)",
    )
    p.add_argument("--port", type=int, default=None, help="port (default: 8080)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route but /health")
    p.add_argument("--n-seq-max", type=int, default=None, help="requests decoded together (default: 8)")
    p.add_argument("--n-ctx", type=int, default=None, help="context of one request, prompt + answer (default: 2048)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: the cores, at most 8)")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting for a sequence before 429 (default: 64)")
    p.add_argument(
        "--max-active",
        type=int,
        default=None,
        help="most adapters of one mix run per sequence, and the largest top-k of arrow/spectr (default: 4, spectr's top-k)",
    )
    p.add_argument(
        "--flash-attn",
        choices=("on", "off"),
        default=None,
        help="flash attention (default: on, as llama-server; the Python API's default is off, as llama-cpp-python)",
    )
    p.add_argument(
        "--skip-embeddings",
        action="store_true",
        default=None,
        help="load PEFT adapters with an embedding LoRA the base cannot take without that part",
    )


def _client_options(p: argparse.ArgumentParser) -> None:
    """What a client meets: its model names, CORS, the defaults of requests that leave a field out."""
    p.add_argument(
        "--alias",
        default=None,
        help="the base model's name(s) in /v1/models, comma-separated; the first in sorted order is its id (default: loramux)",
    )
    p.add_argument("--tags", default=None, help="the base model's tags in /v1/models, comma-separated")
    p.add_argument("--chat-template", default=None, metavar="JINJA", help="a Jinja chat template to use instead of the model's")
    p.add_argument("--chat-template-file", type=Path, default=None, metavar="FILE", help="the same, from a file")
    p.add_argument("--slots", action=argparse.BooleanOptionalAction, default=None, help="serve GET /slots (default: off, 501)")
    p.add_argument(
        "--webui",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the playground page at / (default: on): a browser page that compares mixes side by side on one prompt, "
        "through this server's API only; --no-webui turns it off (/ answers 404), as llama-server's flag does",
    )
    p.add_argument("--verbose", action="store_true", default=None, help='every answer carries "__verbose": the prompt as read')
    p.add_argument(
        "--unknown-model",
        choices=("base", "error"),
        default=None,
        help='a request whose "model" names nothing loaded: "base" answers as with no model (llama-server\'s way; '
        'the header X-Loramux-Unknown-Model says so; the default), "error" answers 404 (vLLM\'s way)',
    )
    p.add_argument(
        "--cors",
        default=None,
        metavar="ORIGINS",
        help='allow browsers on these origins (comma-separated, or "*") to call the API (default: no CORS headers)',
    )
    p.add_argument(
        "--n-predict",
        type=int,
        default=None,
        help="max_tokens of requests that give none (default: 16 for completions, until the end for chat; -1: until the end)",
    )
    p.add_argument("--temp", dest="temperature", type=float, default=None, help="temperature of requests that give none")
    p.add_argument("--seed", type=int, default=None, help="seed of requests that give none")


def settings_from(args: argparse.Namespace):
    from loramux.server.settings import merge, read_config

    config = read_config(args.config) if args.config else {}
    flags = {
        k: getattr(args, k)
        for k in (
            "base",
            "adapters",
            "router",
            "upstream",
            "host",
            "port",
            "api_key",
            "n_seq_max",
            "n_ctx",
            "threads",
            "max_queue",
            "max_active",
            "skip_embeddings",
            "llama_server",
            "ray",
            "replicas",
            "max_adapter_sets",
            "affinity",
            "unknown_model",
            "slots",
            "webui",
            "verbose",
            "n_predict",
            "temperature",
            "seed",
        )
    }
    flags["cors"] = _listed(args.cors)
    flags["tags"] = _listed(args.tags)
    aliases = _listed(args.alias)
    flags["model_id"], flags["aliases"] = (sorted(aliases)[0], aliases) if aliases else (None, None)
    flags["chat_template"] = args.chat_template
    if args.chat_template_file is not None:
        try:
            flags["chat_template"] = args.chat_template_file.read_text()
        except OSError as exc:
            raise LoramuxError(f"--chat-template-file {args.chat_template_file}: {exc}") from None
    flags["flash_attn"] = None if args.flash_attn is None else args.flash_attn == "on"
    return merge(config, flags)


def _listed(value: str | None) -> list[str] | None:
    """A comma-separated flag value as a list (None when not given)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise LoramuxError("loramux serve needs the server extra: pip install 'loramux[serve]'") from None
    settings = settings_from(args)
    if settings.ray:
        from loramux.ray.app import run_local

        run_local(settings)
        return 0
    if settings.llama_server:
        from dataclasses import replace

        from loramux.server.child import patched_llama_server
        from loramux.server.hook import build_hook_app

        with patched_llama_server(settings) as url:
            _serve(uvicorn, build_hook_app(replace(settings, upstream=url)), settings)
        return 0
    if settings.upstream:
        from loramux.server.hook import build_hook_app

        app = build_hook_app(settings)
    else:
        from loramux.server.launch import build_pool_app

        app = build_pool_app(settings)
    _serve(uvicorn, app, settings)
    return 0


def _exit_after_shutdown(signum, frame) -> None:
    raise SystemExit(0)


def _serve(uvicorn, app, settings) -> None:
    """Run the app until SIGINT / SIGTERM. uvicorn shuts down gracefully, then raises the signal
    again with the handler it found: ours turns SIGTERM into SystemExit(0), so every ``with`` of
    the caller (the child llama-server of --llama-server) unwinds, and the exit status is 0."""
    import signal

    signal.signal(signal.SIGTERM, _exit_after_shutdown)
    sockets = [_bound_socket(host, settings.port) for host in settings.hosts]
    for host in settings.hosts:
        print(f"loramux serve: listening on http://{_url_host(host)}:{settings.port}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=sockets)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bound_socket(host: str, port: int):
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6, names resolved), as uvicorn would bind it."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        raise LoramuxError(f"cannot listen on {_url_host(host)}:{port}: {exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
