"""Train a router on task-labelled prompts and export it (needs the ``train`` and ``onnx`` extras).

Rows are ``{"task", "input", ...}``. A row whose task names an adapter of the pool is labelled
with that adapter. Rows of tasks without an adapter train the "none of these" outcome, at most
``none_per_task`` rows per such task (default 5: the LoraHub setting, where an unseen task may
contribute about five labelled examples; 0 leaves them out and the router has no "none" outcome).

A stratified ``val_fraction`` of the labelled rows is held out of training and scored at the end
(the "held-out check"); ``check_rows`` (e.g. a dev split) are scored too when given.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from loramux.mix import Mix
from loramux.router.errors import RouterError
from loramux.router.features import BaseTokenizer, FeatureRecipe, prompt_ids, token_embedding_table
from loramux.router.metadata import RouterMetadata
from loramux.router.selection import SelectionSettings

NONE_LABEL = "(none)"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of router training (the defaults train the 22-task BBH split in seconds)."""

    hidden: int = 64
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    val_fraction: float = 0.1
    none_per_task: int = 5
    max_tokens: int = 1024
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1:
            raise RouterError("hidden, epochs and batch_size must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise RouterError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.none_per_task < 0:
            raise RouterError(f"none_per_task must be >= 0, got {self.none_per_task}")


@dataclass
class RoutingCheck:
    """Top-1 routing of the trained network on a set of rows (argmax over all outcomes)."""

    name: str
    n: int
    accuracy: float  # over every row (rows of tasks without an adapter count as "none")
    adapter_rows: int  # rows whose task has an adapter
    adapter_accuracy: float  # top-1 accuracy on those rows
    none_rows: int  # rows of tasks without an adapter (0 when the router has no none outcome)
    none_recall: float | None  # share of those routed to "none"
    per_outcome: dict[str, float]
    confusions: list[tuple[str, str, int]]  # (true, predicted, count), most frequent first

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "adapter_rows": self.adapter_rows,
            "adapter_top1_accuracy": round(self.adapter_accuracy, 4),
            "none_rows": self.none_rows,
            "none_recall": None if self.none_recall is None else round(self.none_recall, 4),
            "confusions": [list(c) for c in self.confusions[:5]],
        }

    def summary(self) -> str:
        line = f"{self.name}: top-1 routing accuracy {self.adapter_accuracy:.4f} on {self.adapter_rows} rows of tasks with an adapter"
        if self.none_rows:
            line += f"; {self.none_recall:.4f} of {self.none_rows} rows of tasks without one routed to 'none'"
        lines = [line]
        for true, pred, count in self.confusions[:5]:
            lines.append(f"  {count:3d} x {true} -> {pred}")
        return "\n".join(lines)


@dataclass
class TrainResult:
    """The trained torch network, the file written, and the held-out checks."""

    model: Any  # loramux.router.model.RouterNet
    metadata: RouterMetadata
    path: Path | None
    outcomes: list[str]  # adapters, then NONE_LABEL if the router has a none outcome
    validation: RoutingCheck | None
    checks: list[RoutingCheck] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def _schedule(step: int, total: int, warmup: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up over the first 10% of steps, then cosine decay to 0."""
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


class _AdamW:
    """AdamW (decoupled weight decay) for a handful of tensors.

    torch.optim's optimizers import torch._dynamo on first use, which costs 2-12 s here: more
    than the whole training. This is the textbook update, nothing more.
    """

    def __init__(self, params: list, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        import torch

        self.params = params
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, lr: float) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                p.mul_(1.0 - lr * self.weight_decay)
                m.mul_(b1).add_(p.grad, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)


def adapter_names_in(path: str | os.PathLike) -> list[str]:
    """Names of the adapters under ``path`` as the pool would address them (GGUF stems, PEFT folder names)."""
    from loramux.pool import adapter_name, find_adapter_sources

    sources, _ = find_adapter_sources(path)
    return sorted(adapter_name(s) for s in sources)


def _stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_val = int(len(idx) * fraction)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def _check(name: str, logits: np.ndarray, labels: np.ndarray, outcomes: Sequence[str], none_index: int | None) -> RoutingCheck:
    pred = logits.argmax(axis=1)
    hit = pred == labels
    is_none = labels == none_index if none_index is not None else np.zeros(len(labels), dtype=bool)
    per: dict[str, float] = {outcomes[k]: float(hit[labels == k].mean()) for k in np.unique(labels)}
    conf = Counter((outcomes[t], outcomes[p]) for t, p in zip(labels, pred) if t != p)
    return RoutingCheck(
        name=name,
        n=int(len(labels)),
        accuracy=float(hit.mean()) if len(labels) else float("nan"),
        adapter_rows=int((~is_none).sum()),
        adapter_accuracy=float(hit[~is_none].mean()) if (~is_none).any() else float("nan"),
        none_rows=int(is_none.sum()),
        none_recall=float(hit[is_none].mean()) if is_none.any() else None,
        per_outcome=per,
        confusions=[(t, p, c) for (t, p), c in conf.most_common()],
    )


@dataclass
class _Labels:
    """The rows kept for training and their outcome indices (adapters, then "none" when present)."""

    names: list[str]
    rows: list[Mapping[str, Any]]
    y: np.ndarray
    none_counts: Counter[str]

    @property
    def none_outcome(self) -> bool:
        return bool(self.none_counts)

    @property
    def outcomes(self) -> list[str]:
        return self.names + ([NONE_LABEL] if self.none_outcome else [])

    @property
    def none_index(self) -> int | None:
        return len(self.names) if self.none_outcome else None

    def label_of(self, task: str) -> int:
        """The outcome of a check row's task: its adapter, "none", or -1 (not scored) when the router has no none outcome."""
        if task in self.names:
            return self.names.index(task)
        return len(self.names) if self.none_outcome else -1


def _label_rows(names: list[str], rows: Sequence[Mapping[str, Any]], none_per_task: int) -> _Labels:
    """Adapter rows, and at most ``none_per_task`` rows of each task without an adapter."""
    index = {n: i for i, n in enumerate(names)}
    kept: list[Mapping[str, Any]] = []
    labels: list[int] = []
    none_counts: Counter[str] = Counter()
    for row in rows:
        task = str(row["task"])
        if task in index:
            kept.append(row)
            labels.append(index[task])
        elif none_per_task and none_counts[task] < none_per_task:
            none_counts[task] += 1
            kept.append(row)
            labels.append(len(names))
    missing = sorted(set(names) - {str(r["task"]) for r in kept})
    if missing:
        raise RouterError(f"no training rows for adapter(s) {missing}: every adapter needs rows whose task is its name")
    return _Labels(names, kept, np.array(labels, dtype=np.int64), none_counts)


def _tokenize(
    base: str | os.PathLike,
    recipe: FeatureRecipe,
    rows: Sequence[Mapping[str, Any]],
    check_rows: Mapping[str, Sequence[Mapping[str, Any]]],
    progress: Callable[[str, int, int], None] | None,
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """Token ids of the training rows and of each named check set, with the base model's tokenizer."""
    tokenizer = BaseTokenizer(base)
    try:

        def ids_of(rs: Sequence[Mapping[str, Any]], stage: str) -> list[np.ndarray]:
            out_ids = []
            for i, r in enumerate(rs):
                out_ids.append(prompt_ids(tokenizer, str(r["input"]), recipe))
                if progress and (i % 256 == 0 or i + 1 == len(rs)):
                    progress(stage, i + 1, len(rs))
            return out_ids

        return ids_of(rows, "tokenize"), {name: ids_of(rs, f"tokenize {name}") for name, rs in check_rows.items()}
    finally:
        tokenizer.close()


def _pooled(model: Any, sequences: Sequence[np.ndarray]) -> Any:
    """The network's pooled features of token-id sequences (zeros for an empty one, as the ONNX graph's masked mean)."""
    import torch

    lengths = [max(1, len(s)) for s in sequences]
    flat = np.concatenate([s if len(s) else np.zeros(1, np.int64) for s in sequences]) if sequences else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    with torch.no_grad():
        pooled = model.pool_flat(torch.from_numpy(flat), torch.from_numpy(offsets))
    empty = torch.tensor([len(s) == 0 for s in sequences])
    pooled[empty] = 0.0
    return pooled


def _fit(
    model: Any, x_train: Any, y_train: Any, n_outcomes: int, config: TrainConfig, progress: Callable[[str, int, int], None] | None
) -> float:
    """AdamW, cross-entropy with classes weighted by inverse frequency, warm-up and cosine decay; returns the last epoch's mean loss."""
    import torch

    counts = np.bincount(y_train.numpy(), minlength=n_outcomes).astype(np.float64)
    weights = torch.tensor(counts.sum() / (n_outcomes * np.maximum(counts, 1.0)), dtype=torch.float32)
    optimizer = _AdamW(list(model.parameters()), weight_decay=config.weight_decay)
    total_steps = config.epochs * max(1, -(-len(y_train) // config.batch_size))
    generator = torch.Generator().manual_seed(config.seed)
    loss_value = float("nan")
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        total = 0.0
        for s in range(0, len(order), config.batch_size):
            b = order[s : s + config.batch_size]
            loss = torch.nn.functional.cross_entropy(model.classify(x_train[b]), y_train[b], weight=weights)
            model.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step(config.lr * _schedule(step, total_steps))
            step += 1
            total += float(loss.detach()) * len(b)
        loss_value = total / len(order)
        if progress:
            progress("train", epoch + 1, config.epochs)
    model.eval()
    return loss_value


def _run_checks(
    model: Any,
    x_val: Any,
    y_val: np.ndarray,
    labels: _Labels,
    check_rows: Mapping[str, Sequence[Mapping[str, Any]]],
    check_seqs: Mapping[str, list[np.ndarray]],
) -> tuple[RoutingCheck | None, list[RoutingCheck]]:
    """The held-out check on the validation rows (None when there are none) and one check per named row set."""
    import torch

    outcomes, none_index = labels.outcomes, labels.none_index
    with torch.no_grad():
        validation = None
        if len(y_val):
            logits = model.classify(x_val).numpy()
            validation = _check("held-out check (validation rows of the training data)", logits, y_val, outcomes, none_index)
        checks = []
        for name, rs in check_rows.items():
            labels_c = np.array([labels.label_of(str(r["task"])) for r in rs])
            keep = labels_c >= 0
            logits_c = model.classify(_pooled(model, [s for s, k in zip(check_seqs[name], keep) if k])).numpy()
            checks.append(_check(name, logits_c, labels_c[keep], outcomes, none_index))
    return validation, checks


def _train_network(
    table: np.ndarray,
    labels: _Labels,
    seqs: list[np.ndarray],
    check_seqs: Mapping[str, list[np.ndarray]],
    check_rows: Mapping[str, Sequence[Mapping[str, Any]]],
    config: TrainConfig,
    progress: Callable[[str, int, int], None] | None,
    timings: dict[str, float],
) -> tuple[Any, float, tuple[int, int], tuple[RoutingCheck | None, list[RoutingCheck]]]:
    """The trained RouterNet, its last loss, (training rows, validation rows) and the checks; torch on ``config.threads``."""
    import torch

    from loramux.router.model import RouterNet

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or 1)  # tiny matmuls: one thread is fastest, and immune to oversubscribed cores
    try:
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        model = RouterNet(torch.from_numpy(table), len(labels.outcomes), hidden=config.hidden, dropout=config.dropout)
        t = time.perf_counter()
        x_all = _pooled(model, seqs)
        train_idx, val_idx = _stratified_split(labels.y, config.val_fraction, rng)
        model.set_standardisation(x_all[train_idx])
        timings["pool"] = time.perf_counter() - t
        t = time.perf_counter()
        loss = _fit(model, x_all[train_idx], torch.from_numpy(labels.y[train_idx]), len(labels.outcomes), config, progress)
        timings["train"] = time.perf_counter() - t
        checks = _run_checks(model, x_all[val_idx], labels.y[val_idx], labels, check_rows, check_seqs)
    finally:
        torch.set_num_threads(previous_threads)
    return model, loss, (len(train_idx), len(val_idx)), checks


def _training_record(
    config: TrainConfig,
    labels: _Labels,
    n_train: int,
    n_val: int,
    model: Any,
    loss: float,
    validation: RoutingCheck | None,
    checks: list[RoutingCheck],
) -> dict[str, Any]:
    """What the router file's metadata says about its training."""
    return {
        "rows": int(n_train),
        "validation_rows": int(n_val),
        "none_rows": {k: int(v) for k, v in sorted(labels.none_counts.items())},
        "trainable_parameters": int(model.n_trainable),
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__ if k != "threads"},
        "final_loss": round(loss, 5),
        "validation_top1_accuracy": round(validation.accuracy, 4) if validation else None,
        "checks": {c.name: c.to_json() for c in checks},
    }


def _router_names(adapters: str | os.PathLike | Iterable[str]) -> list[str]:
    names = adapter_names_in(adapters) if isinstance(adapters, (str, os.PathLike)) else sorted(set(adapters))
    if not names:
        raise RouterError("a router needs at least one adapter to route to")
    Mix({n: 1.0 for n in names})  # every name must be usable in a mix (raises MixError naming the bad one)
    return names


def _log_none_outcome(labels, config: TrainConfig, log: Callable[[str], None] | None) -> None:
    if labels.none_outcome and log:
        counts = labels.none_counts
        log(
            f"'none of these' outcome: {sum(counts.values())} rows from {len(counts)} task(s) without an adapter "
            f"(at most {config.none_per_task} each): {', '.join(sorted(counts))}"
        )


def _export(model, metadata: RouterMetadata, out: str | os.PathLike | None, timings: dict[str, float]) -> Path | None:
    from loramux.router.export import export_router

    if out is None:
        return None
    t = time.perf_counter()
    path = export_router(model.fold(), metadata, out)
    timings["export"] = time.perf_counter() - t
    return path


def train_router(
    base: str | os.PathLike,
    adapters: str | os.PathLike | Iterable[str],
    rows: Sequence[Mapping[str, Any]],
    out: str | os.PathLike | None,
    *,
    config: TrainConfig = TrainConfig(),
    selection: SelectionSettings = SelectionSettings(),
    check_rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a router for ``adapters`` (a folder or names) on ``rows`` and write it to ``out`` (None: do not write).

    ``progress(stage, done, total)`` is called while tokenizing and per epoch; ``log`` gets one-line notes.
    """
    from loramux.converters import read_base_model

    start = time.perf_counter()
    timings: dict[str, float] = {}
    names = _router_names(adapters)
    info = read_base_model(base)
    labels = _label_rows(names, rows, config.none_per_task)
    _log_none_outcome(labels, config, log)

    t = time.perf_counter()
    seqs, check_seqs = _tokenize(base, FeatureRecipe(max_tokens=config.max_tokens), labels.rows, check_rows or {}, progress)
    timings["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    table = token_embedding_table(base)
    timings["embeddings"] = time.perf_counter() - t
    recipe = FeatureRecipe(max_tokens=config.max_tokens, embedding_dim=int(table.shape[1]), projected_dim=config.hidden)

    model, loss, (n_train, n_val), (validation, checks) = _train_network(
        table, labels, seqs, check_seqs, check_rows or {}, config, progress, timings
    )
    metadata = RouterMetadata(
        adapters=tuple(names),
        none_outcome=labels.none_outcome,
        base_fingerprint=info.fingerprint,
        base_name=info.name,
        features=recipe,
        selection=selection,
        training=_training_record(config, labels, n_train, n_val, model, loss, validation, checks),
    )
    path = _export(model, metadata, out, timings)
    return TrainResult(
        model=model,
        metadata=metadata,
        path=path,
        outcomes=labels.outcomes,
        validation=validation,
        checks=checks,
        seconds=time.perf_counter() - start,
        timings=timings,
    )


__all__ = ["NONE_LABEL", "RoutingCheck", "TrainConfig", "TrainResult", "adapter_names_in", "train_router"]
