"""AdapterPool: one base model, many named LoRA adapters, a weighted mix per request, one engine.

>>> from loramux import AdapterPool
>>> with AdapterPool() as pool:                       # the embedded default base model
...     pool.load_adapters("adapters/")               # *.gguf files and/or PEFT folders
...     out = pool.create_chat_completion(
...         [{"role": "user", "content": "not ( True ) and True is"}],
...         mix={"boolean_expressions": 1.0}, temperature=0)
...     out["choices"][0]["message"]["content"], out["mix"]

The pool is a llama-cpp-python shaped front end over an :class:`~loramux.registry.AdapterRegistry`
(which adapters, from which files), the base model's text side (:class:`~loramux.base_text.BaseText`)
and one engine, which owns every adapter handle (:meth:`AdapterPool.held`). Every request, single
or batched, streamed or not, from any thread or from asyncio, goes through the pool's one
:class:`~loramux.engine.Engine`: one llama.cpp context, continuous batching, each request under
its own mix (per sequence with the native library, else one mix per decode), sampled by
llama.cpp's own sampler chain with llama-cpp-python's parameter meanings. Requests sent while
others run join them at the next decode step.

A mix may also route per token (``mix="arrow"``, ``"arrow:k=2,T=0.5"``, ``"spectr"``): every
token picks its own adapters among all loaded ones at every adapted weight, inside the graph
(native library only); :meth:`AdapterPool.token_choices` reports what each token chose.

Adapters are addressed by name (a GGUF file's stem, a PEFT folder's name); a name is never
reused for different weights. PEFT folders are converted once into a cache
(:mod:`loramux.adapters`). Loading and unloading adapters while requests run is safe and costs
that adapter only: the engine puts it into (or takes it out of) one slot of its pool between two
decode steps, running requests keep their mixes, and an unloaded adapter is freed once no running
request uses it.

Folders of adapters: an adapter the runtime cannot express (``UnsupportedAdapterError``, e.g.
an embedding LoRA on a base with a tied output projection, such as the word_sorting fixture)
is skipped with an :class:`AdapterSkippedWarning` naming it and the reason, and the others
load. With ``skip_embeddings=True`` such an adapter is converted without its embedding LoRA.
An adapter given by its own path is strict: it loads or raises.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

from loramux.adapters import (
    AdapterSkippedWarning,
    LoadReport,
    PoolAdapter,
    SkippedAdapter,
    adapter_name,
    converted_adapter_path,
    find_adapter_sources,
    peft_cache_key,
)
from loramux.base_model import default_base_model
from loramux.base_text import BaseText, TextSide, load_model
from loramux.converters import BaseModelInfo, read_base_model
from loramux.engine import Engine, EngineRequest, RequestHandle
from loramux.errors import LoramuxError
from loramux.mix import Mix, MixLike
from loramux.pool_batch import BatchCompletions
from loramux.pool_completions import Completions
from loramux.pool_forced import TeacherForcing
from loramux.pool_requests import PoolRequest, PoolResult
from loramux.registry import AdapterRegistry
from loramux.routing_report import TokenChoiceReport


def _default_threads() -> int:
    """$LORAMUX_THREADS if set, else the number of cores (at most 8)."""
    env = os.environ.get("LORAMUX_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise LoramuxError(f"LORAMUX_THREADS={env!r} is not a whole number of threads") from None
    return max(1, min(8, os.cpu_count() or 1))


def _engine_fact(attr: str, doc: str) -> property:
    """A read-only property of the pool that is the engine's ``attr``."""
    return property(lambda self: getattr(self._engine, attr), doc=doc)


class AdapterPool(TextSide, Completions, BatchCompletions, TeacherForcing):
    """A base GGUF loaded once, named adapters on it, and the engine that answers every request.

    ``n_ctx`` is the context of one request (prompt + generated tokens); ``n_seq_max`` requests
    decode together (the K/V cache holds ``n_seq_max * n_ctx`` tokens); a mix of at most
    ``max_active`` adapters runs per sequence on the native path (wider mixes: one mix per
    decode); ``max_queue`` bounds the requests waiting for a sequence. ``n_threads`` defaults to
    ``$LORAMUX_THREADS`` or the number of cores (at most 8); ``base`` to the embedded
    SmolLM2-135M-Instruct Q4_1 model; ``seed`` seeds the draws of requests sampled without a seed;
    ``flash_attn`` as ``llama_cpp.Llama``'s (off by default there too); ``device_form`` makes the
    native mixes on host buffers run the form device buffers use (``ggml_mul_mat_id``), to run and
    measure on the CPU what CUDA runs.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        base: str | os.PathLike | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        verbose: bool = False,
        n_seq_max: int = 8,
        max_active: int = 3,
        max_queue: int = 256,
        n_gpu_layers: int = 0,
        use_mmap: bool = True,
        flash_attn: bool = False,
        device_form: bool = False,
    ) -> None:
        from loramux import native

        self._closed = True
        self.base_path = Path(base) if base is not None else default_base_model()
        self.base_info: BaseModelInfo = read_base_model(self.base_path)
        self.n_threads = n_threads or _default_threads()
        self._verbose = verbose
        self.model = load_model(self.base_path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, verbose=verbose)
        self.text = BaseText(self.model, self.base_path.name)
        try:
            self._engine = Engine(
                self.model.model,
                n_seq_max=n_seq_max,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_threads=self.n_threads,
                max_active=max_active,
                native=native.warn_if_unavailable(),
                max_queue=max_queue,
                flash_attn=flash_attn,
                device_form=device_form,
            )
        except Exception:
            self.model.close()
            raise
        self.registry = AdapterRegistry(self._engine, self.model.model, self.base_path, self.base_info, verbose=verbose)
        self._closed = False
        self._probe = None
        self._probe_lock = threading.RLock()
        self._probe_names: tuple[str, ...] = ()  # the engine's adapters the probe holds (borrowed), set on its context
        self._probe_handles: dict = {}
        self._seeds = random.Random(seed)
        self._seed_lock = threading.Lock()

    # --- adapters (the registry's) ------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Names of the loaded adapters, sorted."""
        return self.registry.names

    @property
    def adapters(self) -> Mapping[str, PoolAdapter]:
        """A snapshot of the loaded adapters by name."""
        return self.registry.adapters

    def load(
        self,
        source: str | os.PathLike,
        *,
        name: str | None = None,
        skip_embeddings: bool = False,
        allow_pickle: bool = False,
        outtype: str = "f16",
    ) -> PoolAdapter:
        """Load one adapter (a GGUF LoRA file or a PEFT folder) under ``name`` (default: from the path).

        Safe while requests run; costs this adapter only (the others are not read again). Loading
        the same weights under the same name again returns the loaded adapter; other weights under
        a used name raise AdapterError. Raises AdapterError subclasses for files that cannot be read
        or do not fit the base, RuntimeLoadError if llama.cpp or loramux's library refuses.
        """
        self._check_open()
        return self.registry.load(Path(source), name=name, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle, outtype=outtype)

    def held(self):
        """What the engine holds of each loaded adapter, by name: read-only
        :class:`~loramux.engine.context.HeldAdapter` views (slot, tensors loaded, freed)."""
        self._check_open()
        return self._engine.held()

    def unload(self, name: str) -> None:
        """Unload adapter ``name``: new requests cannot use it at once; running ones finish with it,
        then it is freed. Blocks until it is freed."""
        self._check_open()
        self._probe_let_go(name)
        self.registry.unload(name)

    def load_adapters(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        skip_embeddings: bool = False,
        allow_pickle: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> LoadReport:
        """Load adapters from files, PEFT folders and folders of those; see the module docstring for skips."""
        self._check_open()
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        return self.registry.load_many(paths, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle, progress=progress)

    # --- mixes and engine facts -----------------------------------------------------------------
    def resolve_mix(self, mix: MixLike) -> Mix:
        """Validate ``mix`` (a Mix, mapping, ``"name=w,..."`` or routing-mode string, or None) against the
        loaded adapters (a routed mix, ``"arrow"`` / ``"spectr"``, routes among all of them)."""
        return self.registry.resolve_mix(mix)

    batch_slots = _engine_fact("n_seq_max", "How many requests decode together (``n_seq_max``).")
    n_ctx = _engine_fact("n_ctx", "The context of one request (prompt + generated tokens).")
    n_batch = _engine_fact("n_batch", "The most tokens one ``llama_decode`` takes (the limit of :meth:`logits`, :meth:`token_choices`).")
    native = _engine_fact("native", "True when narrow mixes run per sequence (``loramux.native.available()``).")
    max_active = _engine_fact("max_active", "The most adapters a per-sequence mix holds.")
    stats = _engine_fact(
        "stats", "The engine's counters (:class:`EngineStats`: decode steps, sequences per decode, prefix-cache hits, ...)."
    )
    running = _engine_fact("n_running", "Requests decoding now.")
    waiting = _engine_fact("n_waiting", "Requests waiting for a sequence.")
    busy_slots = _engine_fact("busy_slots", "For each sequence: whether a request runs in it now.")
    lora_stats = _engine_fact("lora_stats", "How often a mix was set on the whole context (:class:`LoraSetStats`).")

    def path_for(self, mix: MixLike) -> str:
        """``"native"`` (per-sequence) or ``"context"`` (one mix per decode): how ``mix`` would run.
        A routed mix this pool cannot run (no native library, no adapter, k above max_active) raises MixError."""
        return self._engine.path_for(self.resolve_mix(mix))

    # --- requests ----------------------------------------------------------------------------
    def engine_request(self, req: PoolRequest) -> EngineRequest:
        """Tokenize ``req`` the way llama-cpp-python does (chat: the base model's template) and validate its mix;
        every other field is checked by :class:`EngineRequest` itself."""
        mix = self.resolve_mix(req.mix)
        tokens, template_stops = self.text.prompt_of(req.prompt, req.messages, req.tool_use, req.turn)
        sampling = req.sampling
        if sampling.seed is None and not sampling.greedy:
            sampling = replace(sampling, seed=self._draw_seed())
        return EngineRequest(
            tokens,
            mix=mix,
            sampling=sampling,
            max_tokens=req.max_tokens,
            stop=tuple(req.stop) + template_stops,
            logprobs=req.logprobs,
            request_id=req.request_id,
        )

    def submit(self, req: PoolRequest, *, loop=None) -> RequestHandle:
        """Queue ``req`` on the engine; the handle streams its events (threads, or asyncio with ``loop``)."""
        self._check_open()
        return self._engine.submit(self.engine_request(req), loop=loop)

    def submit_choices(self, req: PoolRequest, n: int = 1, *, loop=None) -> list[RequestHandle]:
        """Queue ``n`` choices of ``req`` (OpenAI's ``n``): one prompt read once under one mix, its K/V
        copied to the other choices' sequences. Each choice samples with its own chain: with a given
        seed, choice ``i`` draws with ``seed + i``; without one, each gets a seed of its own."""
        self._check_open()
        first = self.engine_request(req)
        seed, given = first.sampling.seed, req.sampling.seed is not None  # seed None: greedy, every choice the same
        seeds = [seed if seed is None else (seed + i) % 2**32 if given else self._draw_seed() for i in range(1, n)]
        return self._engine.submit_choices([first] + [replace(first, sampling=replace(first.sampling, seed=s)) for s in seeds], loop=loop)

    def _draw_seed(self) -> int:
        with self._seed_lock:
            return self._seeds.randint(0, 2**32 - 1)

    def clear_prefix_cache(self) -> None:
        """Forget the cached K/V of ended requests (benchmarks: every prompt is read whole)."""
        self._check_open()
        self._engine.clear_prefix_cache()

    # --- probe -----------------------------------------------------------------------------------
    def probe(self):
        """The pool's :class:`loramux.probe.HiddenProbe` (created on first use, freed with the pool)."""
        self._check_open()
        with self._probe_lock:
            if self._probe is None:
                from loramux.probe import HiddenProbe

                self._probe = HiddenProbe(self.model.model, n_ctx=self.n_ctx, n_threads=self.n_threads)
            return self._probe

    # --- lifetime ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LoramuxError("this AdapterPool is closed")

    def close(self) -> None:
        """Cancel running requests, free the engine's context, the adapters, then the model. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._probe is not None:
            self._probe.close()  # first: its context holds borrowed handles
        self._engine.close()  # frees the context, then every adapter handle (the engine owns them)
        self.registry.close()
        self.model.close()

    def __enter__(self) -> "AdapterPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.registry.names)} adapters, {'native' if self.native else 'stock'}"
        return f"AdapterPool({self.base_path.name}, {state})"


__all__ = [
    "AdapterPool",
    "AdapterSkippedWarning",
    "LoadReport",
    "PoolAdapter",
    "PoolRequest",
    "PoolResult",
    "SkippedAdapter",
    "TokenChoiceReport",
    "adapter_name",
    "converted_adapter_path",
    "find_adapter_sources",
    "peft_cache_key",
]
