"""AdapterPool: one base model loaded once, many named LoRA adapters on it, a weighted mix per request.

>>> from loramux import AdapterPool
>>> with AdapterPool() as pool:                       # the embedded default base model
...     pool.load_adapters("adapters/")               # *.gguf files and/or PEFT folders
...     out = pool.create_chat_completion(
...         [{"role": "user", "content": "not ( True ) and True is"}],
...         mix={"boolean_expressions": 1.0}, temperature=0)
...     out["choices"][0]["message"]["content"], out["mix"]

Adapters are addressed by name (a GGUF file's stem, a PEFT folder's name); a name is never
reused for different weights. PEFT folders are converted on the fly with the project's one
converter (:func:`loramux.converters.convert_peft_to_gguf`) into a cache under
``loramux.base_model.cache_dir() / "adapters"``, keyed by a hash of the PEFT files, the base
model's fingerprint, the converter's sources and its settings, so a second load is a file lookup.

A single request's mix is set on the llama.cpp context with ``llama_set_adapters_lora`` before
it runs (stock llama.cpp has one adapter set per context, so single requests run one at a time,
exactly as llama.cpp computes them). An unchanged mix makes no call; a changed mix also drops the
reusable prompt prefix, because the KV cache computed under one mix is wrong under another.

Many requests at once (:meth:`AdapterPool.generate`, :meth:`~AdapterPool.create_completions`,
:meth:`~AdapterPool.create_chat_completions`) decode together in one llama.cpp batch, each under
its own mix, when the native library is in use (``loramux.native.available()``); otherwise, or
for a mix the native path cannot take, they run one after another (see :mod:`loramux.pool_batch`).

Folders of adapters: an adapter the runtime cannot express (``UnsupportedAdapterError``, e.g.
an embedding LoRA on a base with a tied output projection, such as the word_sorting fixture)
is skipped with an :class:`AdapterSkippedWarning` naming it and the reason, and the others
load. With ``skip_embeddings=True`` such an adapter is converted without its embedding LoRA
(then it differs from PEFT). An adapter given by its own path (not found in a folder) is
strict: it loads or raises. Adapters that do not fit the base (wrong shapes, architecture)
always raise.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from loramux.adapter_file import check_gguf_adapter, file_sha256
from loramux.base_model import cache_dir, default_base_model
from loramux.converters import BaseModelInfo, convert_peft_to_gguf, read_base_model
from loramux.errors import AdapterError, LoramuxError, RuntimeLoadError, UnsupportedAdapterError
from loramux.llama_runtime import ContextLoraState, LoraAdapterHandle, LoraSetStats, capture_llama_log, decode_logits
from loramux.mix import Mix, MixLike
from loramux.pool_batch import PoolBatcher, PoolRequest, PoolResult, generate as _generate_batch

# Part of every cache key, with a hash of the converter's source files (so a changed converter
# never serves an old conversion); bump to invalidate every cached conversion by hand.
CONVERTER_CACHE_VERSION = "1"
PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterSkippedWarning(UserWarning):
    """An adapter found in a folder was not loaded (the message names it and says why)."""


@dataclass(frozen=True)
class PoolAdapter:
    """One adapter loaded in the pool."""

    name: str
    source: Path          # what was given: a GGUF file or a PEFT folder
    gguf_path: Path       # the file llama.cpp loaded (the cached conversion for a PEFT folder)
    sha256: str           # of the GGUF bytes: the identity of the weights
    from_peft: bool
    skip_embeddings: bool   # converted with skip_embeddings=True (an embedding LoRA, if any, was dropped)
    n_modules: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class SkippedAdapter:
    """An adapter of a folder that was not loaded, and why."""

    name: str
    source: Path
    reason: str


@dataclass
class LoadReport:
    """What :meth:`AdapterPool.load_adapters` loaded and skipped."""

    loaded: list[PoolAdapter] = field(default_factory=list)
    skipped: list[SkippedAdapter] = field(default_factory=list)


@dataclass
class PoolStats:
    """Counters of the pool's mix handling."""

    requests: int = 0
    mix_changes: int = 0        # requests whose mix differed from the previous one
    lora: LoraSetStats = field(default_factory=LoraSetStats)


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / PEFT_CONFIG).is_file()


def find_adapter_sources(path: str | os.PathLike) -> tuple[list[Path], bool]:
    """Adapters under ``path`` and whether they came from scanning a folder.

    A ``.gguf`` file or a PEFT folder is itself one adapter (not scanned); any other folder is
    scanned one level deep for ``*.gguf`` files and PEFT folders (sorted by name).
    """
    p = Path(path)
    if p.is_file():
        return [p], False
    if is_peft_folder(p):
        return [p], False
    if not p.is_dir():
        raise AdapterError(f"adapter path {p} does not exist")
    found = sorted(c for c in p.iterdir() if (c.is_file() and c.suffix == ".gguf") or is_peft_folder(c))
    if not found:
        raise AdapterError(f"no adapters in {p}: expected *.gguf LoRA files or PEFT folders (with {PEFT_CONFIG})")
    return found, True


def adapter_name(source: Path) -> str:
    """The name an adapter is addressed by: a GGUF file's stem or a PEFT folder's name."""
    return source.stem if source.is_file() else source.name


@functools.lru_cache(maxsize=1)
def converter_fingerprint() -> str:
    """Hash of the converter package's Python sources."""
    import loramux.converters as converters

    h = hashlib.sha256()
    for f in sorted(Path(converters.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def peft_cache_key(folder: Path, base: BaseModelInfo, *, outtype: str, skip_embeddings: bool) -> str:
    """Hash of the PEFT files, the base model's fingerprint, the converter's sources and settings."""
    h = hashlib.sha256()
    h.update(f"loramux-peft-cache/{CONVERTER_CACHE_VERSION};converter={converter_fingerprint()};base={base.fingerprint};".encode())
    h.update(f"outtype={outtype};skip_embeddings={bool(skip_embeddings)};".encode())
    for fname in (PEFT_CONFIG, *_PEFT_WEIGHT_FILES):
        f = folder / fname
        if f.is_file():
            h.update(f"{fname}:{file_sha256(f)};".encode())
    return h.hexdigest()


def converted_adapter_path(folder: Path, base: BaseModelInfo, *, outtype: str = "f16", skip_embeddings: bool = False) -> Path:
    """Where the cached GGUF conversion of a PEFT folder lives (it may not exist yet)."""
    key = peft_cache_key(folder, base, outtype=outtype, skip_embeddings=skip_embeddings)
    return cache_dir() / "adapters" / f"{folder.name}-{key[:24]}.gguf"


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


def _mixes_for(items: Sequence[Any], mixes: Sequence[MixLike] | None, mix: MixLike) -> list[MixLike]:
    if mixes is None:
        return [mix] * len(items)
    if mix is not None:
        raise LoramuxError("give either mixes= (one per request) or mix= (one for all), not both")
    if len(mixes) != len(items):
        raise LoramuxError(f"{len(items)} requests but {len(mixes)} mixes: give one mix per request")
    return list(mixes)


def _completion_dict(pool: "AdapterPool", r: PoolResult, *, chat: bool) -> dict:
    """An OpenAI-style (chat) completion dict for one batched result."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": r.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": r.text}
    else:
        choice["text"] = r.text
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": str(pool.base_path),
        "choices": [choice],
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                  "total_tokens": r.prompt_tokens + r.completion_tokens},
        "mix": r.mix,
        "path": r.path,
    }


def _release_adapters(handles: dict[str, LoraAdapterHandle], lora: ContextLoraState) -> None:
    """Unset the adapters on the context and free them (while the context and model still exist)."""
    try:
        lora.clear()
    finally:
        for handle in handles.values():
            handle.free()


def _default_threads() -> int:
    """$LORAMUX_THREADS if set, else the number of cores (at most 8)."""
    env = os.environ.get("LORAMUX_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise LoramuxError(f"LORAMUX_THREADS={env!r} is not a whole number of threads") from None
    return max(1, min(8, os.cpu_count() or 1))


class AdapterPool:
    """A base GGUF loaded once through llama-cpp-python, with named adapters and per-request mixes.

    Parameters mirror ``llama_cpp.Llama`` (``n_ctx``, ``n_threads``, ``n_batch``, ``seed``,
    ``verbose``; other keyword arguments are passed on). ``n_threads`` defaults to
    ``$LORAMUX_THREADS`` or the number of cores (at most 8). ``base`` defaults to the embedded
    SmolLM2-135M-Instruct Q4_1 model. Use as a context manager or call :meth:`close`.

    Batches (native path): ``n_seq_max`` requests decode together, each with at most
    ``n_ctx_per_seq`` tokens (prompt + generated; default ``min(n_ctx, 1024)``) and a mix of at
    most ``max_active`` adapters (the cost per token grows with ``max_active``, not with the
    number of adapters in the pool).

    One request runs at a time: calls from other threads wait; a new request from the thread that
    still holds an open stream raises (read the stream to its end or close it first).
    """

    def __init__(
        self,
        base: str | os.PathLike | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        verbose: bool = False,
        n_seq_max: int = 8,
        n_ctx_per_seq: int | None = None,
        max_active: int = 3,
        **llama_kwargs: Any,
    ) -> None:
        import llama_cpp  # patched library or stock: `import loramux` ran native.prepare() first

        from loramux import native

        self._closed = True
        self._handles: dict[str, LoraAdapterHandle] = {}
        self._adapters: dict[str, PoolAdapter] = {}
        base_path = Path(base) if base is not None else default_base_model()
        self.base_info: BaseModelInfo = read_base_model(base_path)
        self.base_path = base_path
        threads = n_threads or _default_threads()
        try:
            with capture_llama_log(echo=verbose) as log:
                self._llm = llama_cpp.Llama(
                    model_path=str(base_path),
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    seed=seed,
                    verbose=verbose,
                    **llama_kwargs,
                )
        except (ValueError, RuntimeError) as exc:
            raise RuntimeLoadError(f"llama.cpp could not load the base model {base_path}: {exc}; {log.reason()}") from exc
        self._closed = False
        self._verbose = verbose
        self._lora = ContextLoraState(self._llm.ctx)
        # llama.cpp adapters must go before the context and the model. llama_cpp.Llama frees those
        # through its exit stack (last in, first out), so register the adapters' release there too:
        # it then runs first however the Llama gets closed (close(), garbage collection).
        self._llm._stack.callback(_release_adapters, self._handles, self._lora)
        # the batch generator's context holds the adapters registered: it goes first of all
        self._native = native.warn_if_unavailable()
        self._batcher = PoolBatcher(self, n_seq_max=n_seq_max, n_ctx_per_seq=n_ctx_per_seq or min(n_ctx, 1024),
                                    max_active=max_active)
        self._llm._stack.callback(self._batcher.close)
        self._active_mix = Mix()
        self._lock = threading.Lock()
        self._owner: int | None = None
        self.stats = PoolStats(lora=self._lora.stats)

    # --- adapters ---------------------------------------------------------------
    @property
    def llama(self):
        """The underlying ``llama_cpp.Llama`` (tokenizer, metadata). Do not set adapters on it directly."""
        self._check_open()
        return self._llm

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

        Loading the same weights under the same name again returns the loaded adapter; other
        weights under a used name raise AdapterError. Raises AdapterError subclasses for files
        that cannot be read or do not fit the base, RuntimeLoadError if llama.cpp refuses.
        """
        self._check_open()
        src = Path(source)
        if not src.exists():
            raise AdapterError(f"adapter {src} does not exist")
        name = name or adapter_name(src)
        Mix({name: 1.0})  # the name must be usable in a mix
        from_peft = src.is_dir()
        if from_peft:
            if not is_peft_folder(src):
                raise AdapterError(f"{src} is a folder without {PEFT_CONFIG}: not a PEFT adapter (use load_adapters for folders of adapters)")
            gguf_path = converted_adapter_path(src, self.base_info, outtype=outtype, skip_embeddings=skip_embeddings)
            if not gguf_path.is_file():
                convert_peft_to_gguf(src, self.base_path, gguf_path, outtype=outtype, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle)
        else:
            gguf_path = src
        facts = check_gguf_adapter(gguf_path, self.base_info, name=name)
        existing = self._adapters.get(name)
        if existing is not None:
            if existing.sha256 == facts.sha256:
                return existing
            raise AdapterError(
                f"adapter name {name!r} is already used for other weights ({existing.source}); "
                f"a name is never reused for different weights: load {src} under another name"
            )
        handle = LoraAdapterHandle(self._llm.model, gguf_path, name, verbose=self._verbose)
        info = PoolAdapter(
            name=name,
            source=src,
            gguf_path=gguf_path,
            sha256=facts.sha256,
            from_peft=from_peft,
            skip_embeddings=bool(from_peft and skip_embeddings),
            n_modules=facts.n_modules,
            ranks=facts.ranks,
        )
        self._handles[name] = handle
        self._adapters[name] = info
        self._batcher.close()  # the next batch registers the grown pool on a new generator
        return info

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
        report = LoadReport()
        for i, (src, scanned) in enumerate(sources):
            try:
                report.loaded.append(self.load(src, skip_embeddings=skip_embeddings, allow_pickle=allow_pickle))
            except UnsupportedAdapterError as exc:
                if not scanned:
                    raise
                skipped = SkippedAdapter(adapter_name(src), src, str(exc))
                report.skipped.append(skipped)
                warnings.warn(f"skipped adapter {skipped.name!r}: {exc}", AdapterSkippedWarning, stacklevel=2)
            if progress:
                progress(i + 1, len(sources))
        return report

    # --- mixes ------------------------------------------------------------------
    def resolve_mix(self, mix: MixLike) -> Mix:
        """Validate ``mix`` (a Mix, mapping, ``"name=w,..."`` string or None) against the loaded adapters."""
        return Mix.coerce(mix).check_known(self._adapters)

    @property
    def batch_slots(self) -> int:
        """How many requests decode together on the native path (``n_seq_max``; 1 on the stock path)."""
        return self._batcher.n_seq_max if self._native else 1

    @property
    def native(self) -> bool:
        """True when batches run on the native per-sequence path (``loramux.native.available()``)."""
        return self._native

    @property
    def active_mix(self) -> Mix:
        """The mix currently set on the llama.cpp context."""
        return self._active_mix

    def _activate(self, mix: Mix) -> None:
        """Set ``mix`` on the context unless it is already set; a change drops the cached prompt prefix."""
        self.stats.requests += 1
        if mix == self._active_mix:
            return
        self._lora.apply([(self._handles[n], w) for n, w in mix.items()])
        self._llm.reset()  # K/V computed under the previous mix must not be reused
        self._active_mix = mix
        self.stats.mix_changes += 1

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        self._check_open()
        if self._owner == threading.get_ident():
            raise LoramuxError(
                "a streamed response from this pool is still open in this thread: read it to the end "
                "or close() it before starting another request"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def _run(self, mix: Mix, call: Callable[[], Any], stream: bool):
        if not stream:
            with self._request():
                self._activate(mix)
                result = call()
            result["mix"] = mix.to_dict()
            return result
        return self._stream(mix, call)

    def _stream(self, mix: Mix, call: Callable[[], Any]) -> Iterator[dict]:
        with self._request():
            self._activate(mix)
            for chunk in call():
                chunk["mix"] = mix.to_dict()
                yield chunk

    # --- llama-cpp-python shaped API ----------------------------------------------
    def create_completion(
        self,
        prompt: str | list[int],
        *,
        mix: MixLike = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
        logprobs: int | None = None,
        **kwargs: Any,
    ):
        """Text completion, as ``llama_cpp.Llama.create_completion``, under ``mix``.

        Returns an OpenAI-style completion dict (or an iterator of chunks with ``stream=True``),
        each with a ``"mix"`` key: the validated mix that was used (zero weights dropped).
        ``temperature=0`` is greedy decoding.
        """
        m = self.resolve_mix(mix)
        args = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repeat_penalty=repeat_penalty, stop=stop or [], seed=seed, stream=stream, logprobs=logprobs, **kwargs)
        return self._run(m, lambda: self._llm.create_completion(prompt, **args), stream)

    __call__ = create_completion

    def create_chat_completion(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        mix: MixLike = None,
        max_tokens: int | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
        **kwargs: Any,
    ):
        """Chat completion through the base model's chat template, as ``llama_cpp.Llama.create_chat_completion``, under ``mix``.

        Returns an OpenAI-style chat completion dict (or an iterator of chunks with ``stream=True``),
        each with a ``"mix"`` key. Generation stops at the template's end-of-turn token.
        """
        m = self.resolve_mix(mix)
        args = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repeat_penalty=repeat_penalty, stop=stop or [], seed=seed, stream=stream, **kwargs)
        msgs = [dict(msg) for msg in messages]
        return self._run(m, lambda: self._llm.create_chat_completion(msgs, **args), stream)

    # --- many requests at once --------------------------------------------------------
    def generate(self, requests: Sequence[PoolRequest]) -> list[PoolResult]:
        """Answer many requests, each under its own mix; results in request order.

        On the native path they decode together in one llama.cpp batch (``n_seq_max`` at a
        time, joining and leaving between steps); each result's ``path`` says which path ran it.
        """
        self._check_open()
        return _generate_batch(self, self._batcher, list(requests), native=self._native, lock=self._request)

    def create_completions(
        self,
        prompts: Sequence[str | list[int]],
        *,
        mixes: Sequence[MixLike] | None = None,
        mix: MixLike = None,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> list[dict]:
        """Text completions of many prompts (``mixes[i]`` for prompt i, or one ``mix`` for all), batched.

        Returns OpenAI-style completion dicts (as :meth:`create_completion`), each with ``"mix"``
        and ``"path"`` (``"native"`` or ``"stock"``).
        """
        reqs = [PoolRequest(prompt=p, mix=m, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=_stops(stop)) for p, m in zip(prompts, _mixes_for(prompts, mixes, mix))]
        return [_completion_dict(self, r, chat=False) for r in self.generate(reqs)]

    def create_chat_completions(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        *,
        mixes: Sequence[MixLike] | None = None,
        mix: MixLike = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | list[str] | None = None,
        seed: int | None = None,
    ) -> list[dict]:
        """Chat completions of many conversations (``mixes[i]`` for conversation i), batched.

        Returns OpenAI-style chat completion dicts (as :meth:`create_chat_completion`), each with
        ``"mix"`` and ``"path"``.
        """
        reqs = [PoolRequest(messages=[dict(m) for m in c], mix=m, max_tokens=max_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, stop=_stops(stop))
                for c, m in zip(conversations, _mixes_for(conversations, mixes, mix))]
        return [_completion_dict(self, r, chat=True) for r in self.generate(reqs)]

    # --- lower level --------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        """Tokens of ``text`` with the base model's tokenizer."""
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llama.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text the base model's chat template makes of ``messages`` (with the generation prompt)."""
        return self.chat_format(messages).prompt

    def chat_format(self, messages: Sequence[Mapping[str, Any]]):
        """llama-cpp-python's formatting of ``messages`` with the base model's chat template
        (``.prompt``, ``.stop``, ``.added_special``), as its chat completion uses it."""
        return self._chat_formatter(messages=[dict(m) for m in messages])

    @functools.cached_property
    def _chat_formatter(self):
        """The base model's chat template, compiled once (every batched chat request formats with it)."""
        from llama_cpp import llama_chat_format

        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise LoramuxError(f"base model {self.base_path.name} has no chat template (tokenizer.chat_template)")
        llm = self.llama
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
            bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
        )

    def logits(self, tokens: Sequence[int], mix: MixLike = None) -> np.ndarray:
        """Teacher-forced logits (n_tokens, n_vocab) of ``tokens`` decoded in one batch under ``mix``.

        At most ``n_batch`` tokens (the pool's constructor argument, 512 by default).
        """
        m = self.resolve_mix(mix)
        if not 0 < len(tokens) <= self._llm.n_batch:
            raise LoramuxError(f"logits() takes 1 to n_batch={self._llm.n_batch} tokens in one batch, got {len(tokens)}")
        with self._request():
            self._activate(m)
            self._llm.reset()
            try:
                return decode_logits(self._llm.ctx, tokens, self._llm.n_vocab())
            finally:
                self._llm.reset()

    # --- lifetime -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LoramuxError("this AdapterPool is closed")

    def close(self) -> None:
        """Free the adapters (first) and then the model and context. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._llm.close()  # runs _release_adapters first

    def __enter__(self) -> "AdapterPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._adapters)} adapters, mix {self._active_mix}"
        return f"AdapterPool({self.base_path.name}, {state})"


__all__ = [
    "AdapterPool",
    "AdapterSkippedWarning",
    "LoadReport",
    "PoolAdapter",
    "PoolRequest",
    "PoolResult",
    "PoolStats",
    "SkippedAdapter",
    "adapter_name",
    "converted_adapter_path",
    "find_adapter_sources",
    "peft_cache_key",
]
