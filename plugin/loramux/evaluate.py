"""Task accuracy of a mix policy on BBH-style rows: greedy answers, exact and lenient match.

Rows are JSON lines ``{"task", "id", "input", "target"}`` (``id`` optional). Each row is asked as one
user turn through the base model's chat template, answered greedily (temperature 0) and stopped at
the template's end of turn. Every answer is scored twice, and both scores are reported side by side:

- **exact** (``"correct"``, ``"accuracy"``, ``"macro_accuracy"``): the answer equals the target
  after :func:`normalize_answer` (whitespace runs collapsed, ends stripped, lower case);
- **lenient** (``"correct_lenient"``, ``"accuracy_lenient"``, ``"macro_accuracy_lenient"``):
  :func:`lenient_match`, after the same normalisation: (a) trailing punctuation (``. ! , ; :``)
  and quotes at either end are ignored on both sides; (b) for an option-letter target ``(X)``, an
  answer whose leading option letter is X (``(X)``, ``X``, ``X)``, ``X.``, or ``(X) text``,
  ``X) text``, ``X. text``) matches unless it names another option too. Nothing else is forgiven
  (``yes, because ...`` does not match ``yes``); the full rule is :func:`lenient_match`'s docstring.

Generation is capped per task at the longest target of that task in the data (in tokens) plus
``TOKEN_MARGIN``: a longer answer cannot equal any target of its task after normalisation, so the
cap saves time without changing the exact score. The lenient score reads the same capped answers:
an option letter followed by its text may be cut short, which does not change its leading letter.

Mix modes (``--mix MODE``) come from a small registry keyed by prefix, so other parts of loramux
can add modes without touching the loop: :func:`register_mix_mode`. Built in:

- ``base``: the empty mix;
- ``oracle``: the adapter named like the row's task (the base model for tasks with no adapter,
  listed under ``"tasks_without_adapter"`` in the JSON);
- ``uniform``: every loaded adapter, equal weights summing to 1;
- ``fixed:name=w,...``: one fixed mix for every row;
- ``arrow[:k=3,T=1]``, ``spectr[:k=4]``: per-token routing among every loaded adapter, inside the
  graph (:mod:`loramux.token_routing`; native library); each row's ``"mix"`` in the JSON is the mode;
- any router of :mod:`loramux.router.registry` (``router:PATH``, ``retrieval:KEYS``, ``logo``,
  ``file:MIX.json``, ...): the router chooses each row's mix (:class:`RoutedPolicy`), and the
  result gains its routing accuracy.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from loramux.converters.atomic import atomic_output
from loramux.errors import LoramuxError, MixError
from loramux.eval_choices import DEFAULT_WEIGHTS, TaskChoiceMap, task_choice_map
from loramux.mix import Mix
from loramux.progress import progress_bar
from loramux.router.registry import is_router_spec, open_router, router_kinds
from loramux.token_routing import ROUTING_MODES

TOKEN_MARGIN = 16
REQUIRED_KEYS = ("task", "input", "target")


_TRAILING = ".!,;:\"'` "
_QUOTES = "\"'` "
_OPTION = re.compile(r"\(([a-z])\)")
_LEADING_OPTION = re.compile(r"(?:\(([a-z])\)|([a-z])[).])(?: (.*))?|([a-z])")
# another option up front, after the leading one: "c) ...", "c. ...", or a connector and a letter ("or c", "/ (c)")
_OPTION_UP_FRONT = re.compile(r"([a-z])[).](?: |$)|(?:or|and|&|/) ?\(?([a-z])\)?[).]?(?: |$)")


def normalize_answer(text: str) -> str:
    """Collapse whitespace runs to one space, strip the ends, lower-case."""
    return " ".join(str(text).split()).lower()


def exact_match(answer: str, target: str) -> bool:
    """Whether ``answer`` equals ``target`` after :func:`normalize_answer` (``loramux eval``'s "exact" column)."""
    return normalize_answer(answer) == normalize_answer(target)


def _lenient_form(text: str) -> str:
    """:func:`normalize_answer`, then trailing ``. ! , ; :`` and quotes at either end dropped."""
    return normalize_answer(text).rstrip(_TRAILING).lstrip(_QUOTES)


def _option_letter(answer: str) -> str | None:
    """The leading option letter of an answer in :func:`_lenient_form`; None when it has none, or
    names a different option too (another ``(y)`` anywhere, or ``y)``, ``y.``, ``or y``, ``/ y`` up front)."""
    m = _LEADING_OPTION.fullmatch(answer)
    if m is None:
        return None
    letter, rest = m.group(1) or m.group(2) or m.group(4), m.group(3) or ""
    if any(other != letter for other in _OPTION.findall(rest)):
        return None
    up_front = _OPTION_UP_FRONT.match(rest)
    if up_front is not None and (up_front.group(1) or up_front.group(2)) != letter:
        return None
    return letter


def lenient_match(answer: str, target: str) -> bool:
    """Whether ``answer`` matches ``target`` by the lenient rule, reported next to exact match.

    The rule (``loramux eval``'s "lenient" column; the demo marks answers by it):

    - both sides go through :func:`normalize_answer` (whitespace runs collapsed, lower case), and an
      exact match is always a lenient match;
    - (a) trailing punctuation is ignored on both sides: ``. ! , ; :`` at the end, and quotes
      (double, single and back quotes) at either end, so ``False.`` and ``"false"`` match ``False``;
    - (b) when the target is an option letter ``(X)``, an answer whose leading option letter is X
      matches: ``(X)``, ``X``, ``X)``, ``X.`` alone, or ``(X) text``, ``X) text``, ``X. text`` (the
      option followed by its text); but not when the answer names a different option too (another
      ``(Y)`` anywhere, or ``(X) or Y``, ``(X) / Y``, ``(X) Y)`` up front); rule (b) applies
      only to targets of the form ``(X)``;
    - nothing else is forgiven: ``True.`` does not match ``False``; ``Bob`` does not match ``(B)``;
      a bare letter followed by text (``B is right``) is not an option; ``yes, because ...`` does
      not match ``yes`` (only the bare answer plus trailing punctuation, or an option letter
      followed by its text); an empty answer (or one of punctuation only) matches only an empty
      target.
    """
    if exact_match(answer, target):
        return True
    a, t = _lenient_form(answer), _lenient_form(target)
    if not a or not t:
        return False
    option = _OPTION.fullmatch(t)
    return a == t or (option is not None and _option_letter(a) == option.group(1))


def load_rows(path: str | os.PathLike, *, tasks: Iterable[str] | None = None, limit_per_task: int | None = None) -> list[dict[str, Any]]:
    """Read JSON-lines rows, keeping the file order; optionally only ``tasks`` and the first N rows per task."""
    p = Path(path)
    if not p.is_file():
        raise LoramuxError(f"data file {p} does not exist")
    wanted = set(tasks) if tasks is not None else None
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise LoramuxError(f"{p}:{lineno}: not a JSON line ({exc})") from None
            missing = [k for k in REQUIRED_KEYS if k not in row]
            if missing:
                raise LoramuxError(f"{p}:{lineno}: row lacks {missing}; rows need {list(REQUIRED_KEYS)}")
            task = str(row["task"])
            if wanted is not None and task not in wanted:
                continue
            if limit_per_task is not None and counts.get(task, 0) >= limit_per_task:
                continue
            counts[task] = counts.get(task, 0) + 1
            row.setdefault("id", counts[task] - 1)
            rows.append(row)
    if wanted is not None:
        absent = sorted(wanted - set(counts))
        if absent:
            raise LoramuxError(f"{p}: no rows for task(s) {absent}")
    if not rows:
        raise LoramuxError(f"{p}: no rows to evaluate")
    return rows


# --- mix modes ---------------------------------------------------------------------------


class MixPolicy(Protocol):
    """Chooses the mix for each row. ``report()`` may add keys to the result JSON."""

    def mix_for(self, row: Mapping[str, Any]) -> Mix: ...

    def report(self) -> dict[str, Any]: ...


@dataclass
class ModeContext:
    """What a mode factory may use: the pool (adapter names, tokenizer) and the rows to evaluate."""

    pool: Any  # loramux.pool.AdapterPool
    rows: Sequence[Mapping[str, Any]]


ModeFactory = Callable[[str | None, ModeContext], MixPolicy]
_MODES: dict[str, ModeFactory] = {}


def register_mix_mode(prefix: str, factory: ModeFactory) -> None:
    """Register (or replace) the factory for ``--mix PREFIX`` / ``--mix PREFIX:ARG``."""
    if not prefix or ":" in prefix:
        raise ValueError(f"a mix mode prefix must be non-empty and contain no ':', got {prefix!r}")
    _MODES[prefix] = factory


def mix_modes() -> list[str]:
    """Registered mode prefixes."""
    return sorted(_MODES)


def make_policy(mode: str, context: ModeContext) -> MixPolicy:
    """Parse ``MODE`` (``prefix`` or ``prefix:arg``) and build its policy."""
    prefix, sep, arg = mode.partition(":")
    factory = _MODES.get(prefix)
    if factory is not None:
        return factory(arg if sep else None, context)
    if is_router_spec(mode):
        return RoutedPolicy(open_router(mode, context.pool), context.pool, mode)
    routers = ", ".join(k.usage for k in router_kinds())
    raise MixError(f"unknown mix mode {mode!r}; known: {', '.join(mix_modes())} (fixed:name=w,...), or a router: {routers}")


@dataclass
class _Constant:
    mix: Mix

    def mix_for(self, row: Mapping[str, Any]) -> Mix:
        return self.mix

    def report(self) -> dict[str, Any]:
        return {}


@dataclass
class _Oracle:
    names: set[str]
    missing: set[str] = field(default_factory=set)

    def mix_for(self, row: Mapping[str, Any]) -> Mix:
        task = str(row["task"])
        if task in self.names:
            return Mix.one_hot(task)
        self.missing.add(task)
        return Mix()

    def report(self) -> dict[str, Any]:
        return {"tasks_without_adapter": sorted(self.missing)} if self.missing else {}


def _no_arg(mode: str, arg: str | None) -> None:
    if arg is not None:
        raise MixError(f"mix mode {mode!r} takes no argument (got {mode}:{arg})")


def _base_mode(arg: str | None, ctx: ModeContext) -> MixPolicy:
    _no_arg("base", arg)
    return _Constant(Mix())


def _oracle_mode(arg: str | None, ctx: ModeContext) -> MixPolicy:
    _no_arg("oracle", arg)
    names = set(ctx.pool.names)
    missing = sorted({str(r["task"]) for r in ctx.rows} - names)
    if missing:
        warnings.warn(f"oracle: no adapter named like task(s) {missing}; those rows use the base model", stacklevel=2)
    return _Oracle(names)


def _uniform_mode(arg: str | None, ctx: ModeContext) -> MixPolicy:
    _no_arg("uniform", arg)
    if not ctx.pool.names:
        raise MixError("mix mode 'uniform' needs adapters: pass --adapters")
    return _Constant(Mix.uniform(ctx.pool.names))


def _fixed_mode(arg: str | None, ctx: ModeContext) -> MixPolicy:
    if not arg:
        raise MixError("mix mode 'fixed' needs a mix: fixed:name=w,name=w")
    return _Constant(ctx.pool.resolve_mix(Mix.parse(arg)))


def _routed_mode(mode: str) -> ModeFactory:
    """``arrow`` / ``arrow:k=2,T=0.5`` (or spectr): one routed mix for every row."""

    def factory(arg: str | None, ctx: ModeContext) -> MixPolicy:
        if not ctx.pool.names:
            raise MixError(f"mix mode {mode!r} routes among the loaded adapters: pass --adapters")
        mix = ctx.pool.resolve_mix(Mix.parse(mode if arg is None else f"{mode}:{arg}"))
        ctx.pool.path_for(mix)  # refused before any row runs when this pool cannot route (native library, max_active)
        return _Constant(mix)

    return factory


BASE = "(base)"
TIE = "(tie)"
ROUTED = "(routed)"


def top_adapter(mix: Mix) -> str:
    """The adapter with the highest weight in ``mix``: BASE for the empty mix, TIE when several share it,
    ROUTED for a per-token routed mix (no fixed weights: each token picks its own)."""
    if mix.token_routing is not None:
        return ROUTED
    if mix.is_base:
        return BASE
    best = max(mix.values())
    top = [n for n, w in mix.items() if w == best]
    return top[0] if len(top) == 1 else TIE


@dataclass
class RoutedPolicy:
    """A router of :mod:`loramux.router.registry` choosing each row's mix, with its routing accuracy.

    ``report()`` adds ``"routing_top1_accuracy"`` (among rows whose task names an adapter the router
    can choose, the share whose mix's highest-weight adapter is that adapter; a tie or the base
    model is a miss) and ``"routing"`` (rows behind it, fallbacks taken and why, and per task
    without an adapter, where its rows went)."""

    router: Any
    pool: Any
    spec: str
    hits: int = 0
    scored: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    unmatched: dict[str, Counter] = field(default_factory=dict)

    def mix_for(self, row: Mapping[str, Any]) -> Mix:
        routing = self.router.route(str(row["input"]))
        mix = self.pool.resolve_mix(routing.mix)
        task, top = str(row["task"]), top_adapter(mix)
        if routing.fallback:
            self.fallbacks[routing.fallback] += 1
        if task in self.router.adapters:
            self.scored += 1
            self.hits += top == task
        else:
            self.unmatched.setdefault(task, Counter())[top] += 1
        return mix

    def close(self) -> None:
        self.router.close()

    def report(self) -> dict[str, Any]:
        return {
            "router": self.spec,
            "routing_top1_accuracy": self.hits / self.scored if self.scored else None,
            "routing": {
                "rows_with_adapter": self.scored,
                "fallbacks": dict(self.fallbacks),
                "tasks_without_adapter": {t: dict(c.most_common()) for t, c in sorted(self.unmatched.items())},
            },
        }


register_mix_mode("base", _base_mode)
register_mix_mode("oracle", _oracle_mode)
register_mix_mode("uniform", _uniform_mode)
register_mix_mode("fixed", _fixed_mode)
for _mode in ROUTING_MODES:
    register_mix_mode(_mode, _routed_mode(_mode))


# --- the loop ---------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-row answers and per-task accuracy of one mode, exact and lenient.

    Each row carries ``"correct"`` (exact match) and ``"correct_lenient"`` (:func:`lenient_match`);
    the per-task and macro figures are computed from them."""

    mode: str
    rows: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    choice_map: "TaskChoiceMap | None" = None  # what routed tokens chose per task (evaluate(choice_rows=N))

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """Per task: ``{"accuracy" (exact), "accuracy_lenient", "n"}``."""
        by_task: dict[str, list[tuple[bool, bool]]] = {}
        for r in self.rows:
            by_task.setdefault(r["task"], []).append((bool(r["correct"]), bool(r["correct_lenient"])))
        return {
            t: {"accuracy": sum(e for e, _ in v) / len(v), "accuracy_lenient": sum(le for _, le in v) / len(v), "n": len(v)}
            for t, v in sorted(by_task.items())
        }

    @property
    def macro_accuracy(self) -> float:
        """The mean over tasks of the exact-match accuracy."""
        tasks = self.tasks
        return sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else 0.0

    @property
    def macro_accuracy_lenient(self) -> float:
        """The mean over tasks of the lenient-match accuracy."""
        tasks = self.tasks
        return sum(t["accuracy_lenient"] for t in tasks.values()) / len(tasks) if tasks else 0.0

    def to_json(self) -> dict[str, Any]:
        """``{"mix", "macro_accuracy", "macro_accuracy_lenient", "tasks", "rows"}`` plus the mode's and the run's extra keys."""
        out: dict[str, Any] = {
            "mix": self.mode,
            "macro_accuracy": self.macro_accuracy,
            "macro_accuracy_lenient": self.macro_accuracy_lenient,
            "tasks": self.tasks,
            "rows": self.rows,
        }
        for k, v in self.extra.items():
            out.setdefault(k, v)
        if self.choice_map is not None:
            out["token_choices"] = self.choice_map.to_json()
        return out

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (no partial file on failure)."""
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return Path(path)

    def table(self) -> str:
        """A per-task table and the macro average, for the terminal: exact and lenient accuracy side by side."""
        tasks = self.tasks
        width = max([len("task"), *map(len, tasks)]) + 2
        lines = [f"{'task':<{width}}{'n':>5}  {'exact':>7}  {'lenient':>7}"]
        lines += [f"{t:<{width}}{v['n']:>5}  {v['accuracy']:>7.3f}  {v['accuracy_lenient']:>7.3f}" for t, v in tasks.items()]
        total = sum(v["n"] for v in tasks.values())
        macro = f"{self.macro_accuracy:>7.3f}  {self.macro_accuracy_lenient:>7.3f}"
        lines.append(f"{'macro average (' + str(len(tasks)) + ' tasks)':<{width}}{total:>5}  {macro}")
        return "\n".join(lines)


def task_token_caps(pool: Any, rows: Sequence[Mapping[str, Any]], margin: int = TOKEN_MARGIN) -> dict[str, int]:
    """Per task: the longest target in tokens plus ``margin``."""
    caps: dict[str, int] = {}
    for r in rows:
        n = len(pool.tokenize(str(r["target"]))) + margin
        caps[str(r["task"])] = max(caps.get(str(r["task"]), 0), n)
    return caps


def evaluate(
    pool: Any,
    rows: Sequence[Mapping[str, Any]],
    mode: str,
    *,
    max_tokens: int | None = None,
    batched: bool = True,
    choice_rows: int = 0,
    choice_weights: Sequence[str] | None = DEFAULT_WEIGHTS,
) -> EvalResult:
    """Answer every row greedily under the mix ``mode`` chooses; return per-row and per-task results.

    ``batched``: rows go through the pool's engine together (``2 * n_seq_max`` submitted at a
    time, continuous batching), so many rows with different mixes decode in one batch (``extra["paths"]`` counts the rows of each path). ``batched=False``:
    one row at a time through the same engine (the same numerics as a request sent alone).
    ``choice_rows=N`` (routed modes only): then teacher-force the first N rows of each task with
    their answers and keep what their tokens chose at the ``choice_weights`` kinds of base weight
    (:func:`loramux.eval_choices.task_choice_map`) as ``result.choice_map``.
    """
    from loramux.pool_requests import PoolRequest

    policy = make_policy(mode, ModeContext(pool=pool, rows=rows))
    caps = task_token_caps(pool, rows) if max_tokens is None else {}
    routing_start = time.perf_counter()
    try:
        with progress_bar(desc=f"mixes {mode}", unit="row", total=len(rows)) as bar:
            reqs = []
            for row in rows:
                mix = policy.mix_for(row)
                reqs.append(
                    PoolRequest(
                        messages=[{"role": "user", "content": str(row["input"])}], mix=mix, max_tokens=max_tokens or caps[str(row["task"])]
                    )
                )
                bar.update(1)
    finally:
        getattr(policy, "close", lambda: None)()
    routing_seconds = round(time.perf_counter() - routing_start, 1)
    routed = reqs[0].mix if reqs and isinstance(reqs[0].mix, Mix) and reqs[0].mix.token_routing is not None else None
    if choice_rows and routed is None:
        raise MixError(f"token choices are recorded under per-token routing ({', '.join(ROUTING_MODES)}); mode {mode!r} is not one")
    start = time.perf_counter()
    results, answers, paths = _answer_all(pool, rows, reqs, mode, window=None if batched else 1)
    extra = dict(policy.report())
    extra["seconds"] = round(time.perf_counter() - start, 1)
    extra["routing_seconds"] = routing_seconds
    extra["paths"] = paths
    extra["base"] = Path(pool.base_path).name
    extra["adapters"] = list(pool.names)
    choice_map = None
    if choice_rows:
        choice_map = task_choice_map(pool, rows, answers, routed, rows_per_task=choice_rows, weights=choice_weights)
    return EvalResult(mode=mode, rows=results, extra=extra, choice_map=choice_map)


def _answer_all(pool: Any, rows, reqs, mode: str, *, window: int | None):
    """Run the requests; per row its result dict and its answer's token ids, and the rows per path."""
    results: list[dict[str, Any]] = [{}] * len(rows)
    answers: list[list[int]] = [[] for _ in rows]
    paths: dict[str, int] = {}
    correct = answered = 0
    with progress_bar(desc=f"eval {mode}", unit="row", total=len(rows)) as bar:
        for i, out in pool.iter_results(reqs, window=window):
            row = rows[i]
            ok = exact_match(out.text, row["target"])
            lenient = lenient_match(out.text, str(row["target"]))
            correct, answered = correct + ok, answered + 1
            paths[out.path] = paths.get(out.path, 0) + 1
            results[i] = {
                "task": str(row["task"]),
                "id": row["id"],
                "answer": out.text,
                "correct": ok,
                "correct_lenient": lenient,
                "mix": out.mix,
            }
            answers[i] = list(out.tokens)
            bar.update(1)
            bar.set_postfix(acc=f"{correct / answered:.3f}", refresh=False)
    return [r for r in results if r], answers, paths


__all__ = [
    "BASE",
    "ROUTED",
    "EvalResult",
    "RoutedPolicy",
    "TIE",
    "top_adapter",
    "MixPolicy",
    "ModeContext",
    "REQUIRED_KEYS",
    "TOKEN_MARGIN",
    "evaluate",
    "exact_match",
    "lenient_match",
    "load_rows",
    "make_policy",
    "mix_modes",
    "normalize_answer",
    "register_mix_mode",
    "task_token_caps",
]
