"""Which adapters each task's tokens choose under per-token routing (``loramux eval --choices``).

After an eval under a routed mode (``arrow``, ``spectr``, ...), the first ``rows_per_task`` rows of
each task are teacher-forced again, prompt and generated answer together, with the native record
on (:meth:`loramux.AdapterPool.token_choices`): every token's choice at every adapted weight is
kept. A token's share of an adapter is its routing weight there, averaged over the routed base
weights of the kinds asked for (``attn_q,attn_v`` by default: the projections every fixture
adapts, so that all adapters compete); a row's share is the mean over its question and answer
tokens (the chat template's fixed head left out); a task's, the mean over its rows. Teacher
forcing gives the choices of generation itself: a token's routing depends on its own input at
each weight only, which depends on the tokens before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from loramux.mix import Mix
from loramux.progress import progress_bar
from loramux.routing_picture import Heatmap

DEFAULT_WEIGHTS = ("attn_q", "attn_v")
DEFAULT_ROWS_PER_TASK = 3


@dataclass(frozen=True)
class TaskChoiceMap:
    """Per task (rows) and adapter (columns): the mean share of the routing weight its tokens gave."""

    mix: Mix
    weights: tuple[str, ...] | None
    tasks: tuple[str, ...]
    adapters: tuple[str, ...]
    share: np.ndarray  # (len(tasks), len(adapters))
    tokens: Mapping[str, int]  # tokens averaged per task (question + answer, over its rows)
    truncated: int = 0  # rows cut to the pool's n_batch tokens

    def own_rank(self, task: str) -> int | None:
        """Where the adapter named like ``task`` ranks by share among all adapters (1 = most), or None."""
        if task not in self.adapters:
            return None
        row = self.share[self.tasks.index(task)]
        return int(np.sum(row > row[self.adapters.index(task)])) + 1

    def to_json(self) -> dict[str, Any]:
        """``{"mix", "weights", "adapters", "tasks": {task: {"share": {adapter: s}, "own_rank", "tokens"}}, "truncated"}``."""
        tasks = {
            t: {
                "share": {a: round(float(s), 4) for a, s in zip(self.adapters, self.share[i])},
                "own_rank": self.own_rank(t),
                "tokens": self.tokens[t],
            }
            for i, t in enumerate(self.tasks)
        }
        return {
            "mix": self.mix.to_json(),
            "weights": list(self.weights) if self.weights else None,
            "adapters": list(self.adapters),
            "tasks": tasks,
            "truncated": self.truncated,
        }

    def summary(self) -> str:
        """One line per task: its own adapter's rank and the three adapters with the largest share."""
        lines = []
        for i, task in enumerate(self.tasks):
            top = np.argsort(-self.share[i], kind="stable")[:3]
            named = ", ".join(f"{self.adapters[j]} {self.share[i, j]:.3f}" for j in top)
            rank = self.own_rank(task)
            lines.append(f"{task}: own adapter {'-' if rank is None else f'#{rank}'} of {len(self.adapters)}; top: {named}")
        ranks = [r for r in map(self.own_rank, self.tasks) if r is not None]
        if ranks:
            lines.append(
                f"own adapter in the top 3 for {sum(r <= 3 for r in ranks)} of {len(ranks)} tasks; median rank {int(np.median(ranks))}"
            )
        return "\n".join(lines)

    def heatmap(self) -> Heatmap:
        """The picture: tasks as rows, adapters as columns, each task's own adapter outlined."""
        marked = {(i, self.adapters.index(t)) for i, t in enumerate(self.tasks) if t in self.adapters}
        kinds = ",".join(self.weights) if self.weights else "all routed"
        return Heatmap(
            values=self.share,
            row_labels=self.tasks,
            col_labels=self.adapters,
            title=f"{self.mix}: share of the routing weight per task (rows) and adapter (columns)",
            notes=(
                f"mean over the question and answer tokens of each task's rows and over the {kinds} weights of all layers",
                f"darkest = {0.25} or more; red outline: the task's own adapter",
            ),
            marked=marked,
            full=0.25,
            cell=14,
        )


def template_head(pool: Any) -> list[int]:
    """The chat template's tokens before a user message's content (the same for every row)."""
    empty = pool.tokenize(pool.chat_prompt([{"role": "user", "content": ""}]), add_bos=True)
    probe = pool.tokenize(pool.chat_prompt([{"role": "user", "content": "x"}]), add_bos=True)
    n = 0
    while n < min(len(empty), len(probe)) and empty[n] == probe[n]:
        n += 1
    return probe[:n]


def row_tokens(pool: Any, question: str, answer: Sequence[int], head: Sequence[int]) -> tuple[list[int], int]:
    """The teacher-forced tokens of one row (its chat prompt, then its answer) and where its question starts."""
    from loramux.pool_requests import PoolRequest

    prompt = pool.engine_request(PoolRequest(messages=[{"role": "user", "content": question}])).tokens
    start = len(head) if list(prompt[: len(head)]) == list(head) else 0
    return list(prompt) + [int(t) for t in answer], start


def task_choice_map(
    pool: Any,
    rows: Sequence[Mapping[str, Any]],
    answers: Sequence[Sequence[int]],
    mix: Mix,
    *,
    rows_per_task: int = DEFAULT_ROWS_PER_TASK,
    weights: Sequence[str] | None = DEFAULT_WEIGHTS,
) -> TaskChoiceMap:
    """Teacher-force the first ``rows_per_task`` rows of each task (``answers``: each row's generated
    token ids) under the routed ``mix`` and average what their tokens chose (see the module)."""
    adapters = tuple(pool.names)
    picked: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if len(picked.setdefault(str(row["task"]), [])) < rows_per_task:
            picked[str(row["task"])].append(i)
    head, limit = template_head(pool), pool.n_batch
    shares: dict[str, list[np.ndarray]] = {}
    tokens = dict.fromkeys(picked, 0)
    truncated = 0
    with progress_bar(desc="token choices", unit="row", total=sum(map(len, picked.values()))) as bar:
        for task, indices in picked.items():
            for i in indices:
                toks, start = row_tokens(pool, str(rows[i]["input"]), answers[i], head)
                truncated += len(toks) > limit
                report = pool.token_choices(toks[:limit], mix)
                share = report.shares(adapters, weights)
                share = share[:, start:] if share.shape[1] > start else share
                shares.setdefault(task, []).append(share.mean(axis=1))
                tokens[task] += share.shape[1]
                bar.update(1)
    tasks = tuple(picked)
    matrix = np.array([np.mean(shares[t], axis=0) for t in tasks]) if tasks else np.zeros((0, len(adapters)))
    return TaskChoiceMap(mix, tuple(weights) if weights else None, tasks, adapters, matrix, tokens, truncated)


__all__ = ["DEFAULT_ROWS_PER_TASK", "DEFAULT_WEIGHTS", "TaskChoiceMap", "row_tokens", "task_choice_map", "template_head"]
