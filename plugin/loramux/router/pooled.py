"""A data-free sequence router: per-token routing run once over the prompt, pooled into one fixed mix.

``pooled:arrow`` (or ``pooled:spectr``) teacher-forces the prompt, as the request will decode it
(one user turn of the base model's chat template, with the generation prompt), under per-token
routing among every loaded adapter with the native record on (:meth:`AdapterPool.token_choices`).
Every (token, adapted weight) row of the record gives its chosen adapters weights summing to 1;
the router sums each adapter's weight over the rows of the prompt's own text (``span=content``,
the default: the template's fixed tokens, such as a default system prompt, are the same for every
prompt and say nothing about its task; ``span=all`` keeps them) at the base weights that every
loaded adapter adapts (``at=shared``, the default: where an adapter's group is smaller, its few
members share every token's weight among themselves, so an adapter that adapts more weights would
gain share for that alone; ``at=all`` keeps every adapted weight), and divides by the number of
rows: each adapter's **share** of the prompt's routing.

Some adapters take a large share of every text, whatever its task (BENCHMARKS.md: Arrow's choices
per task). ``baseline=template`` (the default) scores each adapter by its **lift**, its share on the
prompt's text over its share on the template's own tokens (the same pass: everything outside the
user's text, such as the system prompt and the role markers, which carry no task),
``(share + EPS) / (template share + EPS)``; ``baseline=none`` scores by the share alone. The ``k``
highest scores make the mix, with weights proportional to the scores (``weights=share``, the
default) or equal (``weights=uniform``).

No samples and no training: the scores come from the adapters' own weights (Arrow's prototypes,
SpectR's row spaces), and the cost is one prefill of the prompt. Generation then runs under the
fixed mix, so the answer's tokens are not re-routed one by one (per-token routing dilutes a strong
narrow adapter over a long answer; BENCHMARKS.md).

Spec: ``pooled:MODE[:options]`` (``:`` or ``,`` before the options), e.g. ``pooled:arrow``,
``pooled:arrow:k=1``, ``pooled:spectr:k=2,weights=uniform``. Options: ``k`` (adapters in the mix,
default 3), ``weights`` (``share`` | ``uniform``), ``span`` (``content`` | ``all``), and the
routing pass's own ``token_k`` (default: the mode's own k, capped by the pool's ``max_active``),
Arrow's ``T`` (default 1) and LoGo's ``cal`` (``pooled:logo-token:cal=none``; default ``spectral``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Collection, Sequence

from loramux.errors import MixError
from loramux.mix import Mix
from loramux.router.options import parse_options
from loramux.router.selection import Routing
from loramux.token_routing import DEFAULT_K, ROUTING_MODES, TokenRouting

DEFAULTS: dict[str, Any] = {
    "k": 3,
    "weights": "share",
    "span": "content",
    "at": "shared",
    "baseline": "template",
    "token_k": 0,
    "T": 0.0,
    "cal": "",
}
BASELINES = ("template", "none")
EPS = 0.01  # a share of 1 %: an adapter the template's tokens never chose is not lifted without bound
WEIGHTS = ("share", "uniform")
SPANS = ("content", "all")
AT = ("shared", "all")
USAGE = "pooled:MODE[:k=3,weights=share|uniform,baseline=template|none,span=content|all,at=shared|all,token_k=N,T=1,cal=spectral]"


@dataclass(frozen=True)
class PromptSpan:
    """A prompt's tokens as a request decodes them, and where the user's own text lies in them."""

    tokens: list[int]
    start: int
    end: int


def chat_prompt_span(pool: Any, prompt: str, limit: int) -> PromptSpan:
    """The tokens of ``prompt`` as one user turn of the chat template (the request's own tokens),
    keeping the last ``limit``, and the positions ``[start, end)`` of the prompt's text in them."""
    text = pool.text
    fmt = text.chat_format([{"role": "user", "content": prompt}])
    add_bos = not fmt.added_special
    tokens = text.tokenize(fmt.prompt, add_bos=add_bos)
    content = prompt if prompt in fmt.prompt else prompt.strip()  # a template may trim the message
    at = fmt.prompt.rfind(content) if content else -1
    if at < 0:  # the template rewrote the text: every token is the prompt's
        start, end = 0, len(tokens)
    else:
        start = len(text.tokenize(fmt.prompt[:at], add_bos=add_bos)) if at else int(add_bos)
        end = len(text.tokenize(fmt.prompt[: at + len(content)], add_bos=add_bos))
    cut = max(0, len(tokens) - limit)
    return PromptSpan(tokens[cut:], max(0, start - cut), max(1, end - cut))


def shared_weights(pool: Any) -> frozenset[str]:
    """The base weights (GGUF names) that every loaded adapter adapts: where all of them compete."""
    from loramux.adapter_file import adapted_weights

    adapted = [adapted_weights(pool.adapters[name].gguf_path) for name in pool.names]
    return frozenset.intersection(*adapted) if adapted else frozenset()


def pooled_shares(choices: Sequence[Any], start: int, end: int, weights: Collection[str] | None = None) -> dict[str, float]:
    """Each adapter's summed weight over the record rows at positions ``[start, end)`` (and at the base
    weights ``weights``, all for None), divided by their number."""
    total: Counter = Counter()
    rows = 0
    for c in choices:
        if start <= c.pos < end and (weights is None or c.module in weights):
            rows += 1
            for name, w in zip(c.adapters, c.weights):
                total[name] += float(w)
    return {name: total[name] / rows for name in sorted(total)} if rows else {}


def parse_spec(arg: str | None) -> tuple[str, dict[str, Any]]:
    """``arrow``, ``arrow:k=1``, ``spectr,k=2`` (the text after ``pooled:``) -> (mode, settings)."""
    text = (arg or "").strip()
    cut = min((i for i in (text.find(":"), text.find(",")) if i >= 0), default=len(text))
    mode, options = text[:cut].strip(), text[cut + 1 :]
    if mode not in ROUTING_MODES:
        raise MixError(f"router 'pooled' needs a routing mode ({', '.join(ROUTING_MODES)}), got {arg!r}; write {USAGE}")
    s = parse_options(options, DEFAULTS, source=f"pooled:{mode}")
    choices = {"weights": WEIGHTS, "span": SPANS, "at": AT, "baseline": BASELINES}
    if s["k"] < 1 or s["token_k"] < 0 or any(s[key] not in allowed for key, allowed in choices.items()):
        allowed = ", ".join(f"{key} in {'|'.join(v)}" for key, v in choices.items())
        raise MixError(f"pooled:{mode}: want k >= 1, token_k >= 0 (0: the mode's own), {allowed}; got {s}")
    return mode, s


def pass_routing(mode: str, settings: dict[str, Any], max_active: int) -> TokenRouting:
    """The per-token routing of the pass: the mode's own k (capped by ``max_active``) unless ``token_k``,
    Arrow's ``T`` and LoGo's ``cal`` when given (TokenRouting refuses them for other modes)."""
    token_k = settings["token_k"] or min(DEFAULT_K[mode], max_active)
    try:
        return TokenRouting(mode, token_k, settings["T"] or None, settings["cal"] or None)
    except MixError as exc:
        raise MixError(f"pooled:{mode}: {exc}") from None


class PooledRouter:
    """Routes a prompt to the top-k adapters of its pooled per-token routing (see the module docstring)."""

    def __init__(self, pool: Any, *, spec: str | None = None) -> None:
        mode, s = parse_spec(spec)
        if not pool.names:
            raise MixError(f"pooled:{mode} routes among the loaded adapters: load some first (--adapters)")
        self.pool, self.settings = pool, s
        self.routing = pool.resolve_mix(Mix(token_routing=pass_routing(mode, s, pool.max_active)))
        pool.path_for(self.routing)  # refused here when this pool cannot route (native library, max_active)
        self.spec = f"pooled:{mode}"
        self._shared: tuple[tuple[str, ...], frozenset[str]] | None = None  # (pool names, their shared weights)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.pool.names)

    def scores(self, prompt: str) -> dict[str, float]:
        """Each adapter's score: its share of the prompt's per-token routing (the pooled record), over its
        share on the template's tokens (``baseline=template``)."""
        span = chat_prompt_span(self.pool, str(prompt), min(self.pool.n_batch, self.pool.n_ctx))
        weights = self._weights()
        choices = self.pool.token_choices(span.tokens, self.routing, modules=weights).choices
        start, end = (span.start, span.end) if self.settings["span"] == "content" else (0, len(span.tokens))
        shares = pooled_shares(choices, start, end, weights)
        if self.settings["baseline"] == "none":
            return shares
        outside = [c for c in choices if not span.start <= c.pos < span.end]
        template = pooled_shares(outside, 0, len(span.tokens), weights)
        return {name: (share + EPS) / (template.get(name, 0.0) + EPS) for name, share in shares.items()}

    def _weights(self) -> frozenset[str] | None:
        """The base weights pooled over (``at=shared``: those every loaded adapter adapts; None: all)."""
        if self.settings["at"] == "all":
            return None
        names = tuple(self.pool.names)
        if self._shared is None or self._shared[0] != names:
            self._shared = (names, shared_weights(self.pool))
        if not self._shared[1]:
            raise MixError(f"{self.spec}: no base weight is adapted by all {len(names)} loaded adapters; use at=all")
        return self._shared[1]

    def route(self, prompt: str) -> Routing:
        scores = self.scores(prompt)
        ranked = sorted(scores, key=lambda n: (-scores[n], n))[: self.settings["k"]]
        if not ranked:
            return Routing(Mix(), {}, None, "", 0.0, fallback="no_routed_rows")
        if self.settings["weights"] == "uniform":
            mix = Mix(dict.fromkeys(ranked, 1.0 / len(ranked)))
        else:
            total = sum(scores[n] for n in ranked)
            mix = Mix({n: scores[n] / total for n in ranked})
        return Routing(mix, scores, None, ranked[0], scores[ranked[0]])

    def close(self) -> None:
        pass


__all__ = ["DEFAULTS", "EPS", "PooledRouter", "PromptSpan", "USAGE", "chat_prompt_span", "parse_spec", "pooled_shares", "shared_weights"]
