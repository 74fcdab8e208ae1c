"""Many requests with different mixes at once: the pool's batched path.

:meth:`AdapterPool.generate <loramux.pool.AdapterPool.generate>` takes a list of
:class:`PoolRequest` (a prompt or chat messages, a mix, limits) and returns one
:class:`PoolResult` per request, in order.

- **Native path** (``loramux.native.available()``): the requests go through one
  :class:`~loramux.native.BatchedGenerator` on a second llama.cpp context of the pool's model
  (``n_seq_max`` sequences; requests join and leave between steps), every request under its own
  mix, all decoded in one ``llama_decode`` per step.
- **Stock path**, per request, where the native path cannot take it: the library is missing
  (one :class:`~loramux.native.NativeUnavailableWarning` per process), the mix has more non-zero
  weights than ``max_active`` (e.g. a uniform mix over the whole pool), or the prompt plus
  ``max_tokens`` does not fit ``n_ctx_per_seq``. These run one after another through the pool's
  single-request API (``llama_set_adapters_lora`` on the pool's own context).

Numerics: the stock path is llama.cpp's own. The native path matches a request run alone with
stock adapters up to llama.cpp's batch floor (tests/test_native_oracle.py documents it: logits
within 2.0 absolute, 0.35 mean), so greedy text can differ from the stock path at near-ties.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

from loramux.errors import LoramuxError
from loramux.mix import Mix, MixLike

if TYPE_CHECKING:  # pragma: no cover
    from loramux.pool import AdapterPool

NATIVE, STOCK = "native", "stock"


@dataclass
class PoolRequest:
    """One request of a batch: ``prompt`` (text or token ids) or chat ``messages``, and its mix.

    ``temperature=0`` is greedy. Sampling uses ``top_k`` (0: off), ``top_p`` (1: off) and a
    per-request ``seed``. ``stop`` strings end generation (the text is cut before them); the
    model's end-of-generation tokens always do.
    """

    prompt: str | Sequence[int] | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    mix: MixLike = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise LoramuxError("a PoolRequest takes exactly one of prompt= or messages=")
        if self.max_tokens < 1:
            raise LoramuxError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)


@dataclass
class PoolResult:
    """What one request produced, and which path ran it (``"native"`` or ``"stock"``)."""

    text: str
    finish_reason: str          # "stop" or "length"
    mix: dict[str, float]
    prompt_tokens: int
    completion_tokens: int
    path: str
    tokens: list[int] | None = None   # generated token ids (native path; None on the stock path)


@dataclass
class _Prepared:
    index: int
    request: PoolRequest
    mix: Mix
    tokens: list[int]
    stop: tuple[str, ...]


class PoolBatcher:
    """The pool's BatchedGenerator, created on first use and dropped when the adapters change."""

    def __init__(self, pool: "AdapterPool", *, n_seq_max: int, n_ctx_per_seq: int, max_active: int) -> None:
        self._pool = pool
        self.n_seq_max = n_seq_max
        self.n_ctx_per_seq = n_ctx_per_seq
        self.max_active = max_active
        self._gen = None

    def close(self) -> None:
        """Free the generator's context and unregister the adapters (before they are freed, or when
        adapters were added: the next batch registers the grown pool)."""
        if self._gen is not None:
            gen, self._gen = self._gen, None
            gen.close()

    def _generator(self):
        if self._gen is None:
            from loramux.native import BatchedGenerator

            pool = self._pool
            adapters = {name: handle.ptr for name, handle in pool._handles.items()}
            self._gen = BatchedGenerator.from_llama(pool.llama, adapters, n_seq_max=self.n_seq_max,
                                                    n_ctx_per_seq=self.n_ctx_per_seq, max_active=self.max_active)
        return self._gen

    def fits_native(self, p: _Prepared) -> bool:
        return (bool(self._pool._handles) and len(p.mix) <= self.max_active
                and len(p.tokens) + p.request.max_tokens <= self.n_ctx_per_seq)

    def run_native(self, prepared: Sequence[_Prepared]) -> list[PoolResult]:
        from loramux.native import GenerationRequest

        gen = self._generator()
        reqs = [GenerationRequest(p.tokens, mix=p.mix.to_dict(), max_tokens=p.request.max_tokens,
                                  temperature=p.request.temperature, top_k=p.request.top_k, top_p=p.request.top_p,
                                  seed=p.request.seed, stop=p.stop, request_id=p.index) for p in prepared]
        out = []
        for p, comp in zip(prepared, gen.run(reqs)):
            out.append(PoolResult(text=comp.text, finish_reason=comp.finish_reason, mix=p.mix.to_dict(),
                                  prompt_tokens=len(p.tokens), completion_tokens=len(comp.tokens), path=NATIVE,
                                  tokens=list(comp.tokens)))
        return out


def prepare(pool: "AdapterPool", index: int, request: PoolRequest) -> _Prepared:
    """Validate the mix and tokenize the request the way llama-cpp-python would."""
    mix = pool.resolve_mix(request.mix)
    stop = tuple(request.stop)
    if request.messages is not None:
        fmt = pool.chat_format(request.messages)
        tokens = pool.llama.tokenize(fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special, special=True)
        extra = fmt.stop if isinstance(fmt.stop, list) else [fmt.stop] if fmt.stop else []
        stop += tuple(s for s in extra if s)
    elif isinstance(request.prompt, str):
        tokens = pool.llama.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)
    else:
        tokens = [int(t) for t in request.prompt]
    if not tokens:
        raise LoramuxError(f"request {index}: the prompt is empty")
    return _Prepared(index, request, mix, list(tokens), stop)


def run_stock(pool: "AdapterPool", p: _Prepared) -> PoolResult:
    """One request through the pool's single-request API (stock per-context mix)."""
    r = p.request
    args = dict(mix=p.mix, max_tokens=r.max_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                min_p=0.0, repeat_penalty=1.0, seed=r.seed, stop=list(r.stop))
    if r.messages is not None:
        out = pool.create_chat_completion(r.messages, **args)
        text = out["choices"][0]["message"]["content"] or ""
    else:
        out = pool.create_completion(p.tokens, **args)
        text = out["choices"][0]["text"]
    usage = out.get("usage", {})
    return PoolResult(text=text, finish_reason=out["choices"][0]["finish_reason"] or "length", mix=p.mix.to_dict(),
                      prompt_tokens=usage.get("prompt_tokens", len(p.tokens)),
                      completion_tokens=usage.get("completion_tokens", 0), path=STOCK)


def generate(pool: "AdapterPool", batcher: PoolBatcher, requests: Sequence[PoolRequest], *, native: bool,
             lock: Callable[[], ContextManager[Any]]) -> list[PoolResult]:
    """Run ``requests``: those the native path takes in one batch (holding ``lock``), the others
    one by one through the pool's single-request API (which takes the lock itself)."""
    prepared = [prepare(pool, i, r) for i, r in enumerate(requests)]
    results: list[PoolResult | None] = [None] * len(prepared)
    batch = [p for p in prepared if native and batcher.fits_native(p)]
    if batch:
        with lock():
            done = batcher.run_native(batch)
        for p, res in zip(batch, done):
            results[p.index] = res
    for p in prepared:
        if results[p.index] is None:
            results[p.index] = run_stock(pool, p)
    return [r for r in results if r is not None]


__all__ = ["NATIVE", "STOCK", "PoolBatcher", "PoolRequest", "PoolResult", "generate", "prepare", "run_stock"]
