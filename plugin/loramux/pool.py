"""AdapterPool: one base model, many named LoRA adapters, a weighted mix per request, one engine.

>>> from loramux import AdapterPool
>>> with AdapterPool() as pool:                       # the embedded default base model
...     pool.load_adapters("adapters/")               # *.gguf files and/or PEFT folders
...     out = pool.create_chat_completion(
...         [{"role": "user", "content": "not ( True ) and True is"}],
...         mix={"boolean_expressions": 1.0}, temperature=0)
...     out["choices"][0]["message"]["content"], out["mix"]

The pool is the adapter registry plus a llama-cpp-python shaped front end. Every request, single
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
(:mod:`loramux.adapters`). Loading and unloading adapters while requests run is safe: the
engine registers the new set between two decode steps, running requests keep their mixes, and
an unloaded adapter is freed once no running request uses it.

Folders of adapters: an adapter the runtime cannot express (``UnsupportedAdapterError``, e.g.
an embedding LoRA on a base with a tied output projection, such as the word_sorting fixture)
is skipped with an :class:`AdapterSkippedWarning` naming it and the reason, and the others
load. With ``skip_embeddings=True`` such an adapter is converted without its embedding LoRA.
An adapter given by its own path is strict: it loads or raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from loramux import responses
from loramux.adapter_file import check_gguf_adapter
from loramux.adapters import (
    PEFT_CONFIG,
    AdapterSkippedWarning,
    LoadReport,
    PinnedFiles,
    PoolAdapter,
    SkippedAdapter,
    adapter_name,
    cached_conversion,
    converted_adapter_path,
    find_adapter_sources,
    is_peft_folder,
    peft_cache_key,
)
from loramux.base_model import default_base_model
from loramux.converters import BaseModelInfo, read_base_model
from loramux.engine import CONTEXT, GREEDY, Engine, EngineRequest, EngineStats, RequestHandle, SamplingParams
from loramux.errors import AdapterError, LoramuxError, RequestError, RuntimeLoadError, UnsupportedAdapterError
from loramux.llama_runtime import LoraAdapterHandle, LoraSetStats, capture_llama_log
from loramux.mix import Mix, MixLike
from loramux.pool_requests import PoolRequest, PoolResult, iter_results, mixes_for, sampling_from
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


def _load_model(path: Path, *, n_gpu_layers: int, use_mmap: bool, verbose: bool):
    import llama_cpp
    from llama_cpp import _internals, _logger

    _logger.set_verbose(verbose)  # what llama_cpp.Llama(verbose=...) does: llama.cpp's log at ERROR unless verbose

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.use_mmap = use_mmap
    try:
        with capture_llama_log(echo=verbose) as log:
            return _internals.LlamaModel(path_model=str(path), params=params, verbose=verbose)
    except (ValueError, RuntimeError) as exc:
        raise RuntimeLoadError(f"llama.cpp could not load the base model {path}: {exc}; {log.reason()}") from exc


class AdapterPool:
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
        self._handles: dict[str, LoraAdapterHandle] = {}
        self._pinned = PinnedFiles()  # what llama.cpp reads (and reads again): copies, safe from changes on disk
        self._adapters: dict[str, PoolAdapter] = {}
        self.base_path = Path(base) if base is not None else default_base_model()
        self.base_info: BaseModelInfo = read_base_model(self.base_path)
        self.n_threads = n_threads or _default_threads()
        self._verbose = verbose
        self.model = _load_model(self.base_path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, verbose=verbose)
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
        self._closed = False
        self._probe = None
        self._probe_lock = threading.Lock()
        self._registry_lock = threading.RLock()
        self._seeds = random.Random(seed)
        self._seed_lock = threading.Lock()

    # --- adapters ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Names of the loaded adapters, sorted."""
        return sorted(self._adapters)

    @property
    def adapters(self) -> Mapping[str, PoolAdapter]:
        return dict(self._adapters)

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

        Safe while requests run. Loading the same weights under the same name again returns the
        loaded adapter; other weights under a used name raise AdapterError. Raises AdapterError
        subclasses for files that cannot be read or do not fit the base, RuntimeLoadError if
        llama.cpp refuses.
        """
        with self._registry_lock:
            prepared = self._prepare(Path(source), name=name, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle, outtype=outtype)
            if isinstance(prepared, PoolAdapter):
                return prepared
            self._register([prepared])
            return prepared[1]

    def _prepare(self, src: Path, *, name: str | None, skip_embeddings: bool, allow_pickle: bool, outtype: str):
        """The loaded PoolAdapter of these weights, or (handle, info) of a new one not registered yet."""
        self._check_open()
        if not src.exists():
            raise AdapterError(f"adapter {src} does not exist")
        name = name or adapter_name(src)
        Mix({name: 1.0})  # the name must be usable in a mix
        gguf_path = self._gguf_for(src, outtype=outtype, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle)
        facts = check_gguf_adapter(gguf_path, self.base_info, name=name)
        existing = self._adapters.get(name)
        if existing is not None:
            if existing.sha256 == facts.sha256:
                return existing
            raise AdapterError(
                f"adapter name {name!r} is already used for other weights ({existing.source}); "
                f"a name is never reused for different weights: load {src} under another name"
            )
        pinned = self._pinned.pin(gguf_path, facts.sha256, name)
        try:
            handle = self._engine.call(
                lambda: LoraAdapterHandle(self.model.model, pinned, name, verbose=self._verbose, adapts_embeddings=facts.adapts_embeddings)
            )
        except BaseException:
            self._pinned.unpin(pinned)
            raise
        info = PoolAdapter(
            name=name,
            source=src,
            gguf_path=gguf_path,
            sha256=facts.sha256,
            from_peft=src.is_dir(),
            skip_embeddings=bool(src.is_dir() and skip_embeddings),
            n_modules=facts.n_modules,
            ranks=facts.ranks,
        )
        return handle, info

    def _register(self, new: list[tuple[LoraAdapterHandle, PoolAdapter]]) -> None:
        """Register the pool grown by ``new`` on the engine (one registration for all of them)."""
        handles = dict(self._handles) | {info.name: h for h, info in new}
        try:
            self._engine.set_adapters(handles)
        except Exception:
            for h, _ in new:
                self._engine.call(h.free)
            self._engine.set_adapters(self._handles)
            raise
        self._handles = handles
        self._adapters = self._adapters | {info.name: info for _, info in new}

    def _gguf_for(self, src: Path, *, outtype: str, skip_embeddings: bool, allow_pickle: bool) -> Path:
        if not src.is_dir():
            return src
        if not is_peft_folder(src):
            raise AdapterError(f"{src} is a folder without {PEFT_CONFIG}: not a PEFT adapter (use load_adapters for folders of adapters)")
        gguf_path = converted_adapter_path(src, self.base_info, outtype=outtype, skip_embeddings=skip_embeddings)
        if not gguf_path.is_file():  # the converter writes atomically: a file here is whole
            cached_conversion(src, self.base_path, gguf_path, outtype=outtype, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle)
        return gguf_path

    def unload(self, name: str) -> None:
        """Unload adapter ``name``: new requests cannot use it at once; running ones finish with it,
        then it is freed. Blocks until it is freed."""
        self._check_open()
        with self._registry_lock:
            if name not in self._adapters:
                raise AdapterError(f"adapter {name!r} is not loaded (loaded: {', '.join(self.names) or 'none'})")
            handle = self._handles[name]
            self._handles = {n: h for n, h in self._handles.items() if n != name}
            self._adapters = {n: a for n, a in self._adapters.items() if n != name}
            self._engine.retire_adapter(name, self._handles, lambda: (handle.free(), self._pinned.unpin(handle.path)))

    def load_adapters(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        skip_embeddings: bool = False,
        allow_pickle: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> LoadReport:
        """Load adapters from files, PEFT folders and folders of those; see the module docstring for skips."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        sources: list[tuple[Path, bool]] = []
        for p in paths:
            found, scanned = find_adapter_sources(p)
            sources.extend((s, scanned) for s in found)
        report, new = LoadReport(), []
        with self._registry_lock:
            try:
                for i, (src, scanned) in enumerate(sources):
                    self._load_into(report, new, src, scanned, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle)
                    if progress:
                        progress(i + 1, len(sources))
            except BaseException:
                for h, _ in new:
                    self._engine.call(h.free)
                raise
            if new:
                self._register(new)  # one registration for the whole folder
        return report

    def _load_into(self, report: LoadReport, new: list, src: Path, scanned: bool, **kwargs: Any) -> None:
        try:
            prepared = self._prepare(src, name=None, outtype="f16", **kwargs)
        except UnsupportedAdapterError as exc:
            if not scanned:
                raise
            skipped = SkippedAdapter(adapter_name(src), src, str(exc))
            report.skipped.append(skipped)
            warnings.warn(f"skipped adapter {skipped.name!r}: {exc}", AdapterSkippedWarning, stacklevel=3)
            return
        if isinstance(prepared, PoolAdapter):
            report.loaded.append(prepared)
        elif any(info.name == prepared[1].name for _, info in new):
            self._engine.call(prepared[0].free)
            raise AdapterError(f"two adapters named {prepared[1].name!r} in one load ({src}); rename one")
        else:
            new.append(prepared)
            report.loaded.append(prepared[1])

    # --- mixes and engine facts -----------------------------------------------------------------
    def resolve_mix(self, mix: MixLike) -> Mix:
        """Validate ``mix`` (a Mix, mapping, ``"name=w,..."`` or routing-mode string, or None) against the
        loaded adapters (a routed mix, ``"arrow"`` / ``"spectr"``, routes among all of them)."""
        return Mix.coerce(mix).check_known(self._adapters)

    @property
    def batch_slots(self) -> int:
        """How many requests decode together (``n_seq_max``)."""
        return self._engine.n_seq_max

    @property
    def n_ctx(self) -> int:
        """The context of one request (prompt + generated tokens)."""
        return self._engine.n_ctx

    @property
    def n_batch(self) -> int:
        """The most tokens one ``llama_decode`` takes (the limit of :meth:`logits` and :meth:`token_choices`)."""
        return min(self._engine.cx.n_batch, self._engine.n_ctx)

    @property
    def native(self) -> bool:
        """True when narrow mixes run per sequence (``loramux.native.available()``)."""
        return self._engine.native

    @property
    def max_active(self) -> int:
        return self._engine.max_active

    @property
    def stats(self) -> EngineStats:
        """The engine's counters (decode steps, sequences per decode, prefix-cache hits, ...)."""
        return self._engine.stats

    @property
    def running(self) -> int:
        """Requests decoding now."""
        return self._engine.n_running

    @property
    def waiting(self) -> int:
        """Requests waiting for a sequence."""
        return self._engine.n_waiting

    @property
    def lora_stats(self) -> LoraSetStats:
        """How often a mix was set on the whole context (``llama_set_adapters_lora``)."""
        return self._engine.cx.lora.stats

    def path_for(self, mix: MixLike) -> str:
        """``"native"`` (per-sequence) or ``"context"`` (one mix per decode): how ``mix`` would run.
        A routed mix this pool cannot run (no native library, no adapter, k above max_active) raises MixError."""
        return self._engine.path_for(self.resolve_mix(mix))

    # --- requests ----------------------------------------------------------------------------
    def engine_request(self, req: PoolRequest) -> EngineRequest:
        """Tokenize ``req`` the way llama-cpp-python does (chat: the base model's template) and validate its mix."""
        mix = self.resolve_mix(req.mix)
        stop = tuple(req.stop)
        if req.messages is not None:
            fmt = self.chat_format(req.messages)
            tokens = self.tokenize(fmt.prompt, add_bos=not fmt.added_special)
            extra = fmt.stop if isinstance(fmt.stop, list) else [fmt.stop] if fmt.stop else []
            stop += tuple(s for s in extra if s)
        elif isinstance(req.prompt, str):
            tokens = self.tokenize(req.prompt, add_bos=True) if req.prompt else [self.model.token_bos()]
        else:
            tokens = [int(t) for t in req.prompt]
        sampling = req.sampling
        if sampling.seed is None and not sampling.greedy:
            with self._seed_lock:
                sampling = SamplingParams(**{**sampling.__dict__, "seed": self._seeds.randint(0, 2**32 - 1)})
        return EngineRequest(
            tokens, mix=mix, sampling=sampling, max_tokens=req.max_tokens, stop=stop, logprobs=req.logprobs, request_id=req.request_id
        )

    def submit(self, req: PoolRequest, *, loop=None) -> RequestHandle:
        """Queue ``req`` on the engine; the handle streams its events (threads, or asyncio with ``loop``)."""
        self._check_open()
        return self._engine.submit(self.engine_request(req), loop=loop)

    def _respond(self, req: PoolRequest, *, chat: bool, stream: bool, extra: Mapping[str, Any] | None = None):
        handle = self.submit(req)
        shape = responses.Shape(chat=chat, model=str(self.base_path), extra={"mix": handle.request.mix.to_json(), **(extra or {})})
        piece = None if chat or req.logprobs is None else self.piece
        if not stream:
            return responses.whole(shape, _cancel_on_exit(handle), piece)
        return responses.chunks(shape, _cancel_on_exit(handle), piece=piece)

    def create_completion(
        self,
        prompt: str | list[int],
        *,
        mix: MixLike = None,
        max_tokens: int | None = 16,
        stop: str | list[str] | None = None,
        stream: bool = False,
        logprobs: int | None = None,
        **sampling: Any,
    ):
        """Text completion, as ``llama_cpp.Llama.create_completion``, under ``mix``.

        Sampling keywords as llama-cpp-python's (``temperature=0.8, top_k=40, top_p=0.95,
        min_p=0.05, typical_p=1, repeat_penalty=1, frequency_penalty=0, presence_penalty=0,
        seed, logit_bias``); ``temperature=0`` is greedy. Returns an OpenAI-style completion dict
        (or an iterator of chunks with ``stream=True``) with ``"mix"`` and ``"path"``.
        """
        req = PoolRequest(
            prompt=prompt, mix=mix, max_tokens=max_tokens, stop=stop or (), logprobs=logprobs, sampling=sampling_from(sampling, chat=False)
        )
        return self._respond(req, chat=False, stream=stream)

    __call__ = create_completion

    def create_chat_completion(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        mix: MixLike = None,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        **sampling: Any,
    ):
        """Chat completion through the base model's chat template, as ``llama_cpp.Llama.create_chat_completion``.

        Sampling keywords as :meth:`create_completion` (chat defaults: ``temperature=0.2``).
        ``max_tokens=None``: until an end-of-turn token or the end of the context.
        """
        req = PoolRequest(
            messages=[dict(m) for m in messages],
            mix=mix,
            max_tokens=max_tokens,
            stop=stop or (),
            sampling=sampling_from(sampling, chat=True),
        )
        return self._respond(req, chat=True, stream=stream)

    def iter_results(self, requests: Sequence[PoolRequest], *, window: int | None = None) -> Iterator[tuple[int, PoolResult]]:
        """Answer many requests, each under its own mix, decoded together; yield ``(index, result)``
        as each ends. All are validated before any runs; at most ``window`` (default
        ``2 * n_seq_max``) are in the engine at a time (``window=1``: one after another)."""
        self._check_open()
        engine_requests = [self.engine_request(r) for r in requests]
        return iter_results(engine_requests, self._engine.submit, window=window or 2 * self.batch_slots)

    def generate(self, requests: Sequence[PoolRequest], *, window: int | None = None) -> list[PoolResult]:
        """Answer many requests, each under its own mix, decoded together; results in request order."""
        results = dict(self.iter_results(list(requests), window=window))
        return [results[i] for i in range(len(results))]

    def create_completions(
        self,
        prompts: Sequence[str | list[int]],
        *,
        mixes: Sequence[MixLike] | None = None,
        mix: MixLike = None,
        max_tokens: int = 16,
        stop: str | list[str] | None = None,
        **sampling: Any,
    ) -> list[dict]:
        """Text completions of many prompts (``mixes[i]`` for prompt i, or one ``mix`` for all), batched;
        greedy unless sampling keywords say otherwise. OpenAI-style dicts as :meth:`create_completion`."""
        params = sampling_from(sampling, chat=False, default=GREEDY)
        reqs = [
            PoolRequest(prompt=p, mix=m, max_tokens=max_tokens, stop=stop or (), sampling=params)
            for p, m in zip(prompts, mixes_for(prompts, mixes, mix))
        ]
        return [r.as_dict(str(self.base_path), chat=False) for r in self.generate(reqs)]

    def create_chat_completions(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        *,
        mixes: Sequence[MixLike] | None = None,
        mix: MixLike = None,
        max_tokens: int = 256,
        stop: str | list[str] | None = None,
        **sampling: Any,
    ) -> list[dict]:
        """Chat completions of many conversations (``mixes[i]`` for conversation i), batched; greedy by default."""
        params = sampling_from(sampling, chat=True, default=GREEDY)
        reqs = [
            PoolRequest(messages=[dict(m) for m in c], mix=m, max_tokens=max_tokens, stop=stop or (), sampling=params)
            for c, m in zip(conversations, mixes_for(conversations, mixes, mix))
        ]
        return [r.as_dict(str(self.base_path), chat=True) for r in self.generate(reqs)]

    def clear_prefix_cache(self) -> None:
        """Forget the cached K/V of ended requests (benchmarks: every prompt is read whole)."""
        self._check_open()
        self._engine.clear_prefix_cache()

    # --- tokens, templates, logits ---------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        """Tokens of ``text`` with the base model's tokenizer."""
        self._check_open()
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    def piece(self, token: int) -> str:
        """The text of one token (llama-cpp-python's ``token_to_piece`` returns its whole buffer, NUL padding included)."""
        import llama_cpp

        buf = ctypes.create_string_buffer(64)
        vocab = llama_cpp.llama_model_get_vocab(self.model.model)
        n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, True)
        if n < 0:  # the buffer is too small: -n bytes are needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, True)
        if n < 0:
            raise LoramuxError(f"llama.cpp could not turn token {token} into text")
        return buf.raw[:n].decode("utf-8", errors="replace")

    def token_eos(self) -> int:
        return self.model.token_eos()

    @property
    def n_layer(self) -> int:
        """The base model's number of layers."""
        import llama_cpp

        return int(llama_cpp.llama_model_n_layer(self.model.model))

    def probe(self):
        """The pool's :class:`loramux.probe.HiddenProbe` (created on first use, freed with the pool)."""
        self._check_open()
        with self._probe_lock:
            if self._probe is None:
                from loramux.probe import HiddenProbe

                self._probe = HiddenProbe(self.model.model, n_ctx=self.n_ctx, n_threads=self.n_threads)
            return self._probe

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text the base model's chat template makes of ``messages`` (with the generation prompt)."""
        return self.chat_format(messages).prompt

    def chat_format(self, messages: Sequence[Mapping[str, Any]]):
        """llama-cpp-python's formatting of ``messages`` with the base model's chat template
        (``.prompt``, ``.stop``, ``.added_special``), as its chat completion uses it."""
        try:
            return self._chat_formatter(messages=[dict(m) for m in messages])
        except Exception as exc:  # jinja2 errors: a message without content, a role the template refuses
            raise RequestError(f"the chat template of {self.base_path.name} cannot format these messages: {exc}") from exc

    @functools.cached_property
    def _chat_formatter(self):
        from llama_cpp import llama_chat_format

        template = self.model.metadata().get("tokenizer.chat_template")
        if not template:
            raise LoramuxError(f"base model {self.base_path.name} has no chat template (tokenizer.chat_template)")
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self.model.detokenize([self.model.token_eos()], special=True).decode(),
            bos_token=self.model.detokenize([self.model.token_bos()], special=True).decode(),
        )

    def logits(self, tokens: Sequence[int], mix: MixLike = None, *, path: str = CONTEXT) -> np.ndarray:
        """Teacher-forced logits (n_tokens, n_vocab) of ``tokens`` decoded alone in one batch under ``mix``.

        ``path="context"`` (default): the mix set on the whole context, exactly what stock
        llama.cpp computes; ``"native"``: as a per-sequence mix. At most ``n_batch`` tokens.
        """
        self._check_open()
        return self._engine.logits(tokens, self.resolve_mix(mix), path=path)

    def token_choices(self, prompt: str | Sequence[int], mix: MixLike) -> TokenChoiceReport:
        """What per-token routing chose for every token of ``prompt`` at every adapted weight.

        ``prompt`` (text, tokenized with BOS as :meth:`create_completion` does, or token ids, at
        most ``n_batch``) is teacher-forced alone in one batch under the routed ``mix`` (``"arrow"``,
        ``"spectr:k=3"``, ``Mix.arrow(k=2)``, ...) on the engine's thread, between two steps of the
        running requests, with the native record on. Needs the native library's fused CPU op (the
        device form does not record) and loaded adapters; a fixed mix is a MixError."""
        self._check_open()
        resolved = self.resolve_mix(mix)
        tokens = self.tokenize(prompt, add_bos=True) if isinstance(prompt, str) else [int(t) for t in prompt]
        choices = self._engine.token_choices(tokens, resolved)
        return TokenChoiceReport(resolved, tuple(tokens), tuple(self.piece(t) for t in tokens), tuple(choices))

    def score(self, items: Sequence[Any]) -> list[float]:
        """Mean target cross-entropy of each :class:`loramux.engine.scoring.ScoreItem` (tokens, n_prompt, mix).

        Items with different mixes are decoded together, as many per ``llama_decode`` as fit in
        ``n_batch`` tokens and the free sequences; every mix must run per sequence (native library,
        at most ``max_active`` adapters)."""
        from loramux.engine.scoring import ScoreItem

        self._check_open()
        resolved = [ScoreItem(tuple(i.tokens), i.n_prompt, self.resolve_mix(i.mix)) for i in items]
        return self._engine.score(resolved)

    # --- lifetime ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LoramuxError("this AdapterPool is closed")

    def close(self) -> None:
        """Cancel running requests, free the engine's context, the adapters, then the model. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._engine.close()
        if self._probe is not None:
            self._probe.close()
        for handle in self._handles.values():
            handle.free()
        self._pinned.close()
        self.model.close()

    def __enter__(self) -> "AdapterPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._adapters)} adapters, {'native' if self.native else 'stock'}"
        return f"AdapterPool({self.base_path.name}, {state})"


def _cancel_on_exit(handle: RequestHandle) -> Iterator:
    """The handle's events; a consumer that stops early (closes the stream) cancels the request."""
    try:
        yield from handle
    finally:
        if not handle.done:
            handle.cancel()


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
