"""``loramux.Router``: a trained router file run by onnxruntime, turning prompts into mixes.

>>> from loramux import Router
>>> router = Router.load("router.onnx")                  # the default base model's tokenizer
>>> routing = router.route("not ( True ) and False is")
>>> routing.mix, routing.top1, routing.confidence
>>> router.providers                                      # e.g. ['CPUExecutionProvider']

Execution providers: ``providers=None`` picks CUDA (``CUDAExecutionProvider``, with the CPU one
behind it) when the installed onnxruntime offers it (``onnxruntime-gpu`` on a machine with a GPU),
else the CPU. Pass ``providers=["cpu"]``, ``["cuda"]`` or full onnxruntime provider names to choose;
``router.providers`` reports what the session really uses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from loramux.mix import Mix
from loramux.router.errors import RouterError, RouterFileError
from loramux.router.features import BaseTokenizer, pad_batch, prompt_ids
from loramux.router.metadata import ATTENTION_MASK, INPUT_IDS, OUTPUT_LOGITS, RouterMetadata, read_metadata_map
from loramux.router.selection import Routing, SelectionSettings, select

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RouterError(f"running a router needs onnxruntime: pip install 'loramux[onnx]' ({exc})") from exc
    return onnxruntime


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """onnxruntime provider names for ``providers`` (None: CUDA when available, else CPU); checked against the install."""
    ort = _onnxruntime()
    available = ort.get_available_providers()
    if providers is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    wanted = [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    if not wanted:
        raise RouterError("no execution provider given; use cpu, cuda or onnxruntime provider names")
    unknown = [p for p in wanted if p not in available]
    if unknown:
        hint = " (install onnxruntime-gpu and run on a machine with a GPU)" if CUDA in unknown else ""
        raise RouterError(f"execution provider(s) {unknown} are not available in this onnxruntime{hint}; available: {available}")
    return wanted


class Router:
    """A loaded router: base-model tokenizer + onnxruntime session + selection settings.

    Build with :meth:`load`. :meth:`route` / :meth:`route_batch` return :class:`Routing` objects
    (``.mix`` is a :class:`loramux.Mix`); :meth:`mix_for` returns the mix alone.
    """

    def __init__(self, path: Path, session: Any, metadata: RouterMetadata, tokenizer: BaseTokenizer, owns_tokenizer: bool) -> None:
        self.path = path
        self.metadata = metadata
        self.settings: SelectionSettings = metadata.selection
        self._session = session
        self._tokenizer = tokenizer
        self._owns_tokenizer = owns_tokenizer

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        base: str | os.PathLike | None = None,
        pool: Any = None,
        adapters: Iterable[str] | None = None,
        providers: str | Sequence[str] | None = None,
        threads: int = 1,
        tokenizer: BaseTokenizer | None = None,
    ) -> "Router":
        """Open a router file and check it against the base model (and the pool's adapters, if given).

        ``base`` defaults to the pool's base model, else the embedded default one. ``pool`` (an
        :class:`loramux.AdapterPool`) or ``adapters`` (names) must hold exactly the router's adapters.
        ``threads`` is onnxruntime's intra-op thread count (1 is fastest for this small graph).
        Raises RouterFileError (missing, corrupt, not ONNX, not a router), RouterMismatchError
        (other base model or other adapters), RouterError (provider not available).
        """
        from loramux.converters import read_base_model

        p = Path(path)
        session, metadata = open_router_session(p, providers=providers, threads=threads)
        if base is None and pool is not None:
            base = pool.base_path
        if base is None:
            from loramux.base_model import default_base_model

            base = default_base_model()
        metadata.check_base(read_base_model(base).fingerprint, base=str(base), source=f"router {p}")
        names = list(pool.names) if pool is not None else (list(adapters) if adapters is not None else None)
        if names is not None:
            metadata.check_adapters(names, source=f"router {p}")
        owns = tokenizer is None
        tok = tokenizer if tokenizer is not None else BaseTokenizer(base)
        return cls(p, session, metadata, tok, owns)

    # --- facts ------------------------------------------------------------------------------
    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters the router chooses among, in output order."""
        return self.metadata.adapters

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers the session uses, in priority order."""
        return list(self._session.get_providers())

    @property
    def tokenizer(self) -> BaseTokenizer:
        return self._tokenizer

    # --- running ----------------------------------------------------------------------------
    def token_ids(self, prompt: str) -> np.ndarray:
        """The ids the router sees for ``prompt`` (base tokenizer, recipe's truncation)."""
        return prompt_ids(self._tokenizer, prompt, self.metadata.features)

    def logits_for_ids(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """Raw ``(batch, n_outcomes)`` logits for already tokenized prompts (one onnxruntime run)."""
        ids, mask = pad_batch(sequences)
        return self.run_padded(ids, mask)

    def run_padded(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One onnxruntime run on a padded batch (int64 arrays of equal shape)."""
        out = self._session.run([OUTPUT_LOGITS], {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask})
        return out[0]

    def logits(self, prompts: Sequence[str]) -> np.ndarray:
        """Raw logits for ``prompts`` (tokenized, padded, one run)."""
        return self.logits_for_ids([self.token_ids(t) for t in prompts])

    def settings_for(self, **overrides: Any) -> SelectionSettings:
        """The router's default selection settings with ``overrides`` applied (None values ignored)."""
        return self.settings.with_overrides(**overrides) if overrides else self.settings

    def route(self, prompt: str, **overrides: Any) -> Routing:
        """Route one prompt; ``overrides`` replace selection settings for this call (top_k=, top_p=, ...)."""
        return self.route_batch([prompt], **overrides)[0]

    def route_batch(self, prompts: Sequence[str], **overrides: Any) -> list[Routing]:
        """Route several prompts in one onnxruntime run."""
        settings = self.settings_for(**overrides)
        logits = self.logits(prompts)
        return [select(row, self.metadata.adapters, settings, none_outcome=self.metadata.none_outcome) for row in logits]

    def mix_for(self, prompt: str, **overrides: Any) -> Mix:
        """The mix for one prompt."""
        return self.route(prompt, **overrides).mix

    def timed_route(self, prompt: str) -> tuple[Routing, float, float]:
        """``(routing, tokenize seconds, onnxruntime seconds)`` for one prompt (for benchmarks and logs)."""
        t0 = time.perf_counter()
        ids = self.token_ids(prompt)
        t1 = time.perf_counter()
        logits = self.logits_for_ids([ids])
        t2 = time.perf_counter()
        return select(logits[0], self.metadata.adapters, self.settings, none_outcome=self.metadata.none_outcome), t1 - t0, t2 - t1

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Free the tokenizer if this router owns it (idempotent)."""
        if self._owns_tokenizer and self._tokenizer is not None:
            self._tokenizer.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Router({self.path.name}, {len(self.adapters)} adapters, providers={self.providers})"


def open_router_session(
    path: str | os.PathLike, *, providers: str | Sequence[str] | None = None, threads: int = 1
) -> tuple[Any, RouterMetadata]:
    """An onnxruntime session on a router file and its metadata (no base or pool checks).

    Raises RouterFileError for a missing, corrupt or non-ONNX file and for ONNX models that are not routers.
    """
    p = Path(path)
    if not p.is_file():
        raise RouterFileError(f"router file {p} does not exist; train one with `loramux router train`")
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    chosen = resolve_providers(providers)
    try:
        session = ort.InferenceSession(str(p), sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        text = str(exc).strip()
        detail = text.splitlines()[0][:300] if text else type(exc).__name__
        raise RouterFileError(
            f"{p} is not a readable ONNX router (corrupt, truncated or not ONNX): onnxruntime says: {detail}. "
            "Train a router with `loramux router train`"
        ) from None
    metadata = read_metadata_map(session.get_modelmeta().custom_metadata_map, source=str(p))
    _check_signature(session, metadata, p)
    return session, metadata


def _check_signature(session: Any, metadata: RouterMetadata, path: Path) -> None:
    """The graph must have the router's inputs and an output as wide as the metadata's outcome list."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if set(inputs) != {INPUT_IDS, ATTENTION_MASK} or OUTPUT_LOGITS not in outputs:
        raise RouterFileError(
            f"{path} carries router metadata but its graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
            f"a router has inputs {[INPUT_IDS, ATTENTION_MASK]} and output {OUTPUT_LOGITS!r}: retrain it"
        )
    width = outputs[OUTPUT_LOGITS].shape[-1]
    if isinstance(width, int) and width != metadata.n_outcomes:
        raise RouterFileError(
            f"{path}: the graph gives {width} scores but the metadata names {metadata.n_outcomes} outcomes; the file is inconsistent: retrain it"
        )


__all__ = ["CPU", "CUDA", "Router", "open_router_session", "resolve_providers"]
