"""Sampling parameters and one llama.cpp sampler chain per sequence.

Every request, whichever front end sent it (the Python API, the CLI, ``loramux eval``, the
server), is sampled by :class:`SequenceSampler`: llama.cpp's own sampler chain, built in the
order and with the parameter meanings of ``llama_cpp.Llama._init_sampler`` (llama-cpp-python):

    logit bias -> penalties (repeat, frequency, presence; last ``penalty_last_n`` generated tokens)
    -> greedy                                   if temperature == 0
    -> top-k -> typical -> top-p -> min-p -> temperature -> dist(seed)   otherwise

``temperature=0`` is greedy (argmax after bias and penalties). ``top_k <= 0`` keeps every token,
``top_p=1``, ``min_p=0`` and ``typical_p=1`` are no-ops, as in llama.cpp. ``seed=None`` draws a
fresh seed per request (llama.cpp's ``LLAMA_DEFAULT_SEED``); a given seed makes the draw
reproducible whatever else is in the batch, because each sequence has its own chain and RNG.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from loramux.errors import RequestError

PENALTY_LAST_N = 64  # llama_cpp.Llama(last_n_tokens_size=64), the window the penalties look at


INT32_MAX = 2**31 - 1  # top_k is a C int in llama.cpp
_REAL = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty", "presence_penalty")
_WHOLE = ("top_k", "penalty_last_n", "seed")  # seed may also be None (a fresh draw)
_RANGES = {
    "temperature": lambda v: v >= 0,
    "top_k": lambda v: abs(v) <= INT32_MAX,
    "top_p": lambda v: 0.0 <= v <= 1.0,
    "min_p": lambda v: 0.0 <= v <= 1.0,
    "typical_p": lambda v: 0.0 < v <= 1.0,
    "repeat_penalty": lambda v: v > 0,
    "penalty_last_n": lambda v: v >= 0,
}


def _real(name: str, value) -> float:
    """A finite real number (not a bool), or a RequestError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"sampling parameter {name} must be a number, got {value!r}", param=name)
    try:
        real = float(value)
    except OverflowError:
        real = math.inf
    if not math.isfinite(real):
        raise RequestError(f"sampling parameter {name} must be a finite number, got {value!r}", param=name)
    return real


def _whole(name: str, value) -> int:
    """A whole number (an int, or a float without a fraction; not a bool), or a RequestError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise RequestError(f"sampling parameter {name} must be a whole number, got {value!r}", param=name)
    return int(value)


def _bias(raw) -> dict[int, float]:
    """``logit_bias`` as ``{token id: finite bias}`` (the ids are checked against the vocabulary at Engine.submit)."""
    if not isinstance(raw, Mapping):
        raise RequestError("logit_bias must be a mapping {token id: bias}", param="logit_bias")
    try:  # -inf bans a token (llama-server's false); other values must be finite
        bias = {int(k): (v if v == -math.inf else _real("logit_bias", v)) for k, v in raw.items()}
    except (TypeError, ValueError, OverflowError):
        raise RequestError("logit_bias maps token ids to numbers", param="logit_bias") from None
    except RequestError:
        raise RequestError("logit_bias maps token ids to finite numbers", param="logit_bias") from None
    return bias


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks its tokens (llama-cpp-python's names and defaults for completions).

    Every type and range is checked here, once, for every front end: a bad value is a
    RequestError whose ``param`` names the field (the server's 400 carries it)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = PENALTY_LAST_N
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF (llama.cpp's grammar format), root rule "root"; checked at Engine.submit

    def __post_init__(self) -> None:
        for name in _REAL:
            object.__setattr__(self, name, _real(name, getattr(self, name)))
        for name in _WHOLE:
            value = getattr(self, name)
            if value is not None or name != "seed":
                object.__setattr__(self, name, _whole(name, value))
        for name, ok in _RANGES.items():
            if not ok(getattr(self, name)):
                raise RequestError(f"sampling parameter {name}={getattr(self, name)!r} is out of range", param=name)
        object.__setattr__(self, "logit_bias", _bias(self.logit_bias))
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise RequestError(f"grammar must be GBNF text, got {self.grammar!r}", param="grammar")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


def grammar_sampler(vocab, grammar: str):
    """llama.cpp's grammar sampler of GBNF ``grammar`` (root rule ``root``) on ``vocab``; RequestError
    naming ``grammar``, with llama.cpp's reason, when it does not parse."""
    import llama_cpp as lc

    from loramux.llama_runtime import capture_llama_log

    with capture_llama_log() as log:
        sampler = lc.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise RequestError(f"grammar does not parse as GBNF with a rule 'root': {log.reason()}", param="grammar")
    return sampler


class SequenceSampler:
    """One llama.cpp sampler chain (``llama_sampler *``) for one request; free it with :meth:`close`."""

    shortlist = 256  # greedy under a grammar: tokens tried before the whole vocabulary (0: always the whole)

    def __init__(self, params: SamplingParams, n_vocab: int, vocab=None) -> None:
        import llama_cpp as lc

        self._lc = lc
        self.params = params
        self._grammar = None  # kept out of the chain: checked on the chosen token first (sample)
        self._n_vocab = n_vocab
        self._chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if not self._chain:
            raise RequestError("llama.cpp could not create a sampler chain")
        try:
            self._build(params, n_vocab, vocab)
        except Exception:
            self.close()
            raise

    def _add(self, sampler) -> None:
        if not sampler:
            raise RequestError("llama.cpp could not create a sampler of the chain")
        self._lc.llama_sampler_chain_add(self._chain, sampler)

    def _build(self, p: SamplingParams, n_vocab: int, vocab) -> None:
        lc = self._lc
        if p.logit_bias:  # ids checked at Engine.submit (EngineRequest.check_limits)
            arr = (lc.llama_logit_bias * len(p.logit_bias))()
            for i, (tok, bias) in enumerate(p.logit_bias.items()):
                arr[i].token, arr[i].bias = tok, bias
            self._add(lc.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), arr))
        self._add(lc.llama_sampler_init_penalties(n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
        if p.grammar is not None:  # applied after the penalties, as in llama-cpp-python's chain (see sample)
            self._grammar = grammar_sampler(vocab, p.grammar)
            self._cand = np.zeros(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            self._one = np.zeros(1, dtype=self._cand.dtype)
        if p.greedy:
            self._add(lc.llama_sampler_init_greedy())
            return
        seed = lc.LLAMA_DEFAULT_SEED if p.seed is None else int(p.seed) & 0xFFFFFFFF
        self._add(lc.llama_sampler_init_top_k(p.top_k))
        self._add(lc.llama_sampler_init_typical(p.typical_p, 1))
        self._add(lc.llama_sampler_init_top_p(p.top_p, 1))
        self._add(lc.llama_sampler_init_min_p(p.min_p, 1))
        self._add(lc.llama_sampler_init_temp(p.temperature))
        self._add(lc.llama_sampler_init_dist(seed))

    def sample(self, ctx, index: int) -> int:
        """Sample from the logits of batch row ``index`` of ``ctx``'s last decode, and accept the token.

        With a grammar, as llama.cpp's common sampler does: the chain chooses a token from every
        candidate; the grammar checks that one token; only when it rejects it does the grammar run
        over the whole vocabulary and the chain choose again among what it allows. The grammar
        and the chain then accept the token."""
        lc = self._lc
        if self._grammar is None:
            return int(lc.llama_sampler_sample(self._chain, ctx, index))
        ptr = lc.llama_get_logits_ith(ctx, index)
        if not ptr:
            raise RequestError(f"llama.cpp has no logits for batch row {index}")
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        token = self._choose(logits, grammar_first=False)
        self._one["id"], self._one["logit"] = token, logits[token]
        if np.isneginf(self._apply(self._grammar, self._one)["logit"][0]):  # rejected
            allowed = self._greedy_allowed(logits) if self._shortlist_exact else None
            token = self._choose(logits, grammar_first=True) if allowed is None else allowed
        lc.llama_sampler_accept(self._grammar, token)
        lc.llama_sampler_accept(self._chain, token)
        return token

    @property
    def _shortlist_exact(self) -> bool:
        """Greedy without penalties: the grammar's best token is the first it allows in logit order."""
        p = self.params
        return self.shortlist > 0 and p.greedy and p.repeat_penalty == 1 and p.frequency_penalty == 0 and p.presence_penalty == 0

    def _greedy_allowed(self, logits: np.ndarray) -> int | None:
        """Greedy under the grammar from the ``shortlist`` best tokens (logit bias added): the first
        the grammar allows, in the greedy sampler's order (logit, then id); None when it allows none
        of them (then the grammar runs over the whole vocabulary). Exact: an allowed token outside
        the shortlist has a lower logit than every token in it."""
        z = logits
        if self.params.logit_bias:
            z = logits.copy()
            for tok, bias in self.params.logit_bias.items():
                z[tok] += bias
        k = min(self.shortlist, self._n_vocab)
        top = np.argpartition(-z, k - 1)[:k]
        top = top[np.lexsort((top, -z[top]))]
        short = self._cand[:k]
        short["id"], short["logit"], short["p"] = top, z[top], 0.0
        allowed = np.flatnonzero(~np.isneginf(self._apply(self._grammar, short)["logit"]))
        return int(short["id"][allowed[0]]) if allowed.size else None

    def _choose(self, logits: np.ndarray, *, grammar_first: bool) -> int:
        """The chain's choice among all candidates (after the grammar's mask with ``grammar_first``)."""
        self._cand["id"] = np.arange(self._n_vocab, dtype=np.int32)
        self._cand["logit"], self._cand["p"] = logits, 0.0
        if grammar_first:
            self._apply(self._grammar, self._cand)
        return self._apply(self._chain, self._cand, selected=True)

    def _apply(self, sampler, cand: np.ndarray, *, selected: bool = False):
        """``llama_sampler_apply`` over the candidates ``cand`` (in place); the selected token id, or ``cand``."""
        lc = self._lc
        arr = lc.llama_token_data_array(ctypes.cast(cand.ctypes.data, ctypes.POINTER(lc.llama_token_data)), len(cand), -1, False)
        lc.llama_sampler_apply(sampler, ctypes.byref(arr))
        if not selected:
            return cand
        if not 0 <= arr.selected < arr.size:
            raise RequestError("llama.cpp's sampler chain selected no token")
        return int(arr.data[arr.selected].id)  # where the chain left it (it may sort or shrink the array)

    def close(self) -> None:
        if self._chain:
            self._lc.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar:
            self._lc.llama_sampler_free(self._grammar)
            self._grammar = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


__all__ = ["GREEDY", "PENALTY_LAST_N", "SamplingParams", "SequenceSampler", "grammar_sampler"]
