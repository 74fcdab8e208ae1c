"""SeqMixer: the adapter pool registered on one llama_context, and a mix per sequence id.

>>> mixer = SeqMixer(ctx_ptr, {"boolean_expressions": ptr_a, "navigate": ptr_b}, max_active=3)
>>> mixer.set(0, {"boolean_expressions": 0.7, "navigate": 0.3})   # sequence 0
>>> mixer.set(1, {"navigate": 1.0})                                # sequence 1, same batch
>>> mixer.clear(0)                                                 # sequence 0: base model

Registration copies the adapters into stacked tensors once (and makes the next decode reserve
the scheduler once); :meth:`SeqMixer.fill` and :meth:`SeqMixer.remove` change one adapter's slot
(reading that adapter only); setting a mix is a write into a host table read at the next decode:
no scheduler rebuild, and graph reuse keeps working. Each call checks the library's status code
and raises a loramux error that names the offending input.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np

from loramux.errors import LoramuxError, MixError, RuntimeLoadError
from loramux.native import _bindings as B
from loramux.token_routing import LOGO_NATIVE_MODES

MixInput = Mapping[str, float] | Iterable[tuple[str, float]] | None

# routing mode names (TokenRouting.native_args: arrow, spectr, and LoGo per calibration) -> enum loramux_route_mode
ROUTE_MODES = {
    "arrow": B.LORAMUX_ROUTE_ARROW,
    "spectr": B.LORAMUX_ROUTE_SPECTR,
    LOGO_NATIVE_MODES["none"]: B.LORAMUX_ROUTE_LOGO,
    LOGO_NATIVE_MODES["spectral"]: B.LORAMUX_ROUTE_LOGO_SPECTRAL,
    LOGO_NATIVE_MODES["frobenius"]: B.LORAMUX_ROUTE_LOGO_FROBENIUS,
}


@dataclass(frozen=True)
class TokenChoice:
    """Which adapters one routed token chose at one adapted base weight, and their weights."""

    module: str  # GGUF base weight name, e.g. "blk.3.attn_q.weight"
    seq_id: int
    pos: int
    adapters: tuple[str, ...]
    weights: tuple[float, ...]


def _address(ptr) -> int:
    """The address held by a ctypes pointer / c_void_p / int (llama_cpp returns several kinds)."""
    if isinstance(ptr, int):
        return ptr
    value = ctypes.cast(ptr, ctypes.c_void_p).value
    if not value:
        raise LoramuxError("an adapter pointer is NULL (was the adapter freed or never loaded?)")
    return value


class SeqMixer:
    """Owns the pool of named adapter slots registered on one llama_context (``llama_context *``).

    ``adapters`` maps names to ``llama_adapter_lora *`` loaded on the context's model: registered
    at once in slots 0..n-1 (``max_active`` clamped to n), or, when empty, an empty pool that
    :meth:`fill` and :meth:`remove` change one adapter at a time (each change reads only the
    adapters it puts in; the other slots are copied inside the library). Token-embedding LoRAs are
    read from their adapters at decode time: such an adapter must outlive its slot.
    ``device_form``: host buffers also take the form device buffers use (``ggml_mul_mat_id``), so
    the CPU runs (and tests check) what CUDA runs.
    """

    def __init__(
        self,
        ctx_ptr,
        adapters: Mapping[str, object] | Sequence[tuple[str, object]] = (),
        *,
        max_active: int = 3,
        device_form: bool = False,
    ) -> None:
        pairs = list(adapters.items()) if isinstance(adapters, Mapping) else list(adapters)
        if max_active < 1:
            raise LoramuxError(f"max_active must be >= 1, got {max_active}")
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise LoramuxError(f"adapter names must be unique, got {names}")
        self._ctx = ctx_ptr
        self.device_form = bool(device_form)  # LoGo routing needs the fused CPU op (False)
        self._slots: list[str | None] = []  # slot id -> name (None: empty)
        self._ids: dict[str, int] = {}
        self._closed = True
        flags = B.LORAMUX_REGISTER_MUL_MAT_ID if device_form else 0
        if pairs:
            arr = (ctypes.c_void_p * len(pairs))(*[_address(p) for _, p in pairs])
            rc = B.loramux_register_adapters(ctx_ptr, ctypes.cast(arr, B.llama_adapter_lora_pp), len(pairs), max_active, flags)
            self._slots = list(names)
        else:
            rc = B.loramux_init_pool(ctx_ptr, max_active, flags)
        if rc != B.LORAMUX_OK:
            raise RuntimeLoadError(
                f"loramux could not register adapters {', '.join(names) or '(an empty pool)'}: {self._named(B.reason(rc))} (code {rc})"
            )
        self._ids = {n: i for i, n in enumerate(names)}
        self.max_active = B.loramux_max_active(ctx_ptr)
        if self.max_active < 1:
            rc = B.loramux_unregister(ctx_ptr)
            undone = "unregistered again" if rc == B.LORAMUX_OK else f"and could not unregister them ({B.reason(rc)})"
            raise RuntimeLoadError(
                f"loramux registered adapters {', '.join(names)} but reports max_active={self.max_active} "
                f"({B.strerror(self.max_active) if self.max_active < 0 else 'no active slots'}); {undone}"
            )
        self._closed = False

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters in their slots, in slot order."""
        return tuple(n for n in self._slots if n is not None)

    @property
    def slots(self) -> dict[str, int]:
        """Each adapter's slot id (the id its mixes use)."""
        return dict(self._ids)

    def changes(self) -> tuple[int, int]:
        """``(rebuilt, in_place)``: how the pool's slot changes were made (``loramux_pool_changes``)."""
        self._check_open()
        rebuilt, in_place = ctypes.c_int32(), ctypes.c_int32()
        rc = B.loramux_pool_changes(self._ctx, ctypes.byref(rebuilt), ctypes.byref(in_place))
        if rc != B.LORAMUX_OK:
            raise LoramuxError(f"loramux could not report its pool changes: {B.reason(rc)} (code {rc})")
        return rebuilt.value, in_place.value

    def fill(self, adapters: Mapping[str, object]) -> None:
        """Put each named adapter into a free slot, in one library call that reads only these
        adapters. Names must be new; raises RuntimeLoadError (naming adapter and tensor) and
        changes nothing when the library refuses one."""
        self._check_open()
        taken = [n for n in adapters if n in self._ids]
        if taken:
            raise LoramuxError(f"adapters {', '.join(taken)} already have a slot; remove them first")
        end = len(self._slots)  # the freed slots first, then new ones after the last
        free = [i for i, n in enumerate(self._slots) if n is None] + list(range(end, end + len(adapters)))
        planned = dict(zip(adapters, free))
        if planned and max(planned.values()) >= B.LORAMUX_MAX_SLOTS:
            raise LoramuxError(f"a pool holds at most {B.LORAMUX_MAX_SLOTS} adapters")
        self._set_slots({planned[n]: (n, _address(p)) for n, p in adapters.items()})

    def remove(self, names: Iterable[str]) -> None:
        """Take the named adapters out of their slots (no sequence may have them in its mix)."""
        self._check_open()
        self._set_slots({self.adapter_id(n): (n, None) for n in names})

    def _set_slots(self, changes: Mapping[int, tuple[str, int | None]]) -> None:
        if not changes:
            return
        slots = (ctypes.c_int32 * len(changes))(*changes)
        ptrs = (ctypes.c_void_p * len(changes))(*[p for _, p in changes.values()])
        rc = B.loramux_set_slots(self._ctx, len(changes), slots, ctypes.cast(ptrs, B.llama_adapter_lora_pp))
        if rc != B.LORAMUX_OK:
            slot_names = dict(enumerate(self._slots)) | {i: n for i, (n, _) in changes.items()}
            why = self._named(B.reason(rc), slot_names)
            what = ", ".join(f"{'put' if p else 'take out'} {n!r}" for n, p in changes.values())
            raise RuntimeLoadError(f"loramux could not {what}: {why} (code {rc})")
        for slot, (name, ptr) in changes.items():
            self._slots.extend([None] * (slot + 1 - len(self._slots)))
            self._slots[slot] = name if ptr is not None else None
            if ptr is None:
                self._ids.pop(name, None)
            else:
                self._ids[name] = slot
        while self._slots and self._slots[-1] is None:
            self._slots.pop()

    def _named(self, text: str, slots: Mapping[int, str | None] | None = None) -> str:
        """The library's reason with each "adapter N" (a slot id) given its name (from ``slots``, else the pool's)."""
        names = dict(enumerate(self._slots)) if slots is None else slots

        def name(m: re.Match) -> str:
            found = names.get(int(m.group(1)))
            return f"adapter {found!r}" if found is not None else m.group(0)

        return re.sub(r"\badapter (\d+)\b", name, text)

    def check_applied(self) -> None:
        """Raise when a decode met an adapted weight the per-sequence hook could not apply."""
        rc = B.loramux_check_applied(self._ctx)
        if rc != B.LORAMUX_OK:
            raise RuntimeLoadError(
                f"loramux could not apply adapters {', '.join(self.names)} in the last decode: "
                f"{self._named(B.reason(rc))} (code {rc}); these adapters cannot be mixed per "
                "sequence on this model"
            )

    @property
    def n_adapters(self) -> int:
        """Slot ids in use (the last filled slot + 1): the length :meth:`set_weights` takes."""
        return len(self._slots)

    def adapter_id(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise MixError(f"adapter {name!r} is not registered on this context (registered: {', '.join(self.names)})") from None

    def _check_open(self) -> None:
        if self._closed:
            raise LoramuxError("this SeqMixer was closed")

    def set(self, seq_id: int, mix: MixInput) -> None:
        """Set sequence ``seq_id``'s mix from ``{name: weight}`` (None or empty: the base model)."""
        items = list(mix.items()) if isinstance(mix, Mapping) else list(mix or [])
        ids = [self.adapter_id(n) for n, _ in items]
        self.set_ids(seq_id, ids, [float(w) for _, w in items], _names=[n for n, _ in items])

    def set_ids(self, seq_id: int, ids: Sequence[int], weights: Sequence[float], *, _names: Sequence[str] | None = None) -> None:
        """Set sequence ``seq_id``'s mix from pool ids and weights (top-k form)."""
        self._check_open()
        n = len(ids)
        if len(weights) != n:
            raise MixError(f"sequence {seq_id}: {n} adapter ids but {len(weights)} weights")
        c_ids = (ctypes.c_int32 * max(n, 1))(*ids)
        c_w = (ctypes.c_float * max(n, 1))(*weights)
        rc = B.loramux_set_seq_mix(self._ctx, int(seq_id), n, c_ids, c_w)
        if rc != B.LORAMUX_OK:
            self._raise(rc, seq_id, ids, weights, _names)

    def set_weights(self, seq_id: int, weights: Sequence[float]) -> None:
        """Set sequence ``seq_id``'s mix from one weight per slot id (dense form; 0 for empty slots)."""
        self._check_open()
        c_w = (ctypes.c_float * max(len(weights), 1))(*weights)
        rc = B.loramux_set_seq_weights(self._ctx, int(seq_id), c_w, len(weights))
        if rc != B.LORAMUX_OK:
            if rc == B.LORAMUX_ERR_BAD_ARG:
                raise MixError(f"sequence {seq_id}: {len(weights)} weights given, one per registered adapter ({self.n_adapters}) needed")
            self._raise(rc, seq_id, list(range(len(weights))), weights, None)

    def clear(self, seq_id: int) -> None:
        """Sequence ``seq_id`` runs the base model again."""
        self._check_open()
        rc = B.loramux_clear_seq_mix(self._ctx, int(seq_id))
        if rc != B.LORAMUX_OK:
            self._raise(rc, seq_id, [], [], None)

    def get(self, seq_id: int) -> dict[str, float]:
        """The mix set on ``seq_id`` as ``{name: weight}`` (empty: base model)."""
        self._check_open()
        cap = self.max_active
        c_ids, c_w = (ctypes.c_int32 * cap)(), (ctypes.c_float * cap)()
        n = B.loramux_get_seq_mix(self._ctx, int(seq_id), cap, c_ids, c_w)
        if n < 0:
            self._raise(n, seq_id, [], [], None)
        return {self._slots[c_ids[j]]: float(c_w[j]) for j in range(n)}

    # --- per-token routing -------------------------------------------------------------------
    def set_routing(self, seq_id: int, mode: str, k: int, temperature: float = 1.0) -> None:
        """Route every token of ``seq_id`` per adapted weight inside the graph: ``mode`` "arrow"
        (top-``k`` of ``|x . v_e|``, weights ``softmax(s / temperature)``), "spectr" (top-``k`` of
        ``||Q_e^T x|| / sqrt(r_e)``, weights ``1/k``; ``temperature`` ignored) or LoGo "logo", "logo-spectral",
        "logo-frobenius" (top-``k`` of ``||D_e x|| / c_e``, ``c_e`` 1, ``||D_e||_2`` or ``||D_e||_F``, weights
        ``s / sum(s)``; ``temperature`` ignored; the fused CPU op only: MixError on the device form), over every
        registered adapter that adapts the weight. :meth:`set` or :meth:`clear` end it."""
        self._check_open()
        if mode not in ROUTE_MODES:
            raise MixError(f"sequence {seq_id}: routing mode {mode!r} is not one of {', '.join(ROUTE_MODES)}")
        # k in [1, max_active] and Arrow's temperature are checked by the library, once (its reason names the value)
        rc = B.loramux_set_seq_routing(self._ctx, int(seq_id), ROUTE_MODES[mode], int(k), float(temperature))
        if rc != B.LORAMUX_OK:
            self._raise(rc, seq_id, [], [], None)

    def get_routing(self, seq_id: int) -> tuple[str, int, float] | None:
        """``(mode, k, temperature)`` of a routed sequence, or None (fixed mix or base model)."""
        self._check_open()
        mode, k, t = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_float()
        rc = B.loramux_get_seq_routing(self._ctx, int(seq_id), ctypes.byref(mode), ctypes.byref(k), ctypes.byref(t))
        if rc != B.LORAMUX_OK:
            self._raise(rc, seq_id, [], [], None)
        names = {v: n for n, v in ROUTE_MODES.items()}
        return (names[mode.value], k.value, t.value) if mode.value in names else None

    @property
    def module_names(self) -> tuple[str, ...]:
        """The adapted base weights, in the record's module order."""
        n = B.loramux_n_modules(self._ctx)
        return tuple((B.loramux_module_name(self._ctx, i) or b"").decode() for i in range(n))

    def prototypes(self, weight: str) -> tuple[tuple[str, ...], np.ndarray]:
        """The Arrow prototypes of base weight ``weight``: adapter names and a (n, n_in) array of unit vectors."""
        self._check_open()
        n_in = ctypes.c_int32()
        name = weight.encode()
        n = B.loramux_get_prototypes(self._ctx, name, 0, None, None, ctypes.byref(n_in))
        if n < 0:
            raise MixError(f"no prototypes for weight {weight!r}: {self._named(B.reason(n))}")
        ids, protos = (ctypes.c_int32 * max(n, 1))(), np.zeros((n, n_in.value), dtype=np.float32)
        got = B.loramux_get_prototypes(self._ctx, name, protos.size, ids, protos.ctypes.data_as(B.c_float_p), ctypes.byref(n_in))
        if got != n:
            raise LoramuxError(f"loramux returned {got} prototypes for weight {weight!r}, expected {n}: {B.reason(got)}")
        return tuple(self._slots[ids[i]] for i in range(n)), protos

    def record(self, on: bool) -> None:
        """Start (True) or stop recording the per-token choices of routed sequences; clears the record."""
        self._check_open()
        rc = B.loramux_set_record(self._ctx, 1 if on else 0)
        if rc != B.LORAMUX_OK:
            raise LoramuxError(f"loramux cannot record routing choices: {self._named(B.reason(rc))} (code {rc})")

    def take_choices(self, modules: Collection[str] | None = None) -> list[TokenChoice]:
        """The choices recorded since :meth:`record` or the last take (then cleared); only those at the base
        weights ``modules`` (GGUF names) when given (the others are read and dropped before any Python object is made)."""
        self._check_open()
        n = B.loramux_take_record(self._ctx, 0, None, None, None, None, None)
        if n < 0:
            raise LoramuxError(f"loramux could not read the routing record: {self._named(B.reason(n))} (code {n})")
        k, cap = self.max_active, max(n, 1)
        cols = [(ctypes.c_int32 * cap)() for _ in range(3)]
        ids, w = (ctypes.c_int32 * (cap * k))(), (ctypes.c_float * (cap * k))()
        got = B.loramux_take_record(self._ctx, n, *cols, ids, w)
        if got != n:
            raise LoramuxError(f"loramux returned {got} record rows, expected {n}: {B.reason(got)}")
        names, slots = self.module_names, self._slots
        module_ids = np.ctypeslib.as_array(cols[0])[:n]
        rows = np.arange(n) if modules is None else np.flatnonzero(np.isin(module_ids, [i for i, m in enumerate(names) if m in modules]))
        module, seq, pos = (np.ctypeslib.as_array(c)[rows].tolist() for c in cols)
        id_rows = np.ctypeslib.as_array(ids).reshape(cap, k)[rows].tolist()
        w_rows = np.ctypeslib.as_array(w).reshape(cap, k)[rows].tolist()
        out = []
        for m, q, p, row_ids, row_w in zip(module, seq, pos, id_rows, w_rows):
            kept = [j for j, i in enumerate(row_ids) if i >= 0]
            out.append(TokenChoice(names[m], q, p, tuple(slots[row_ids[j]] for j in kept), tuple(row_w[j] for j in kept)))
        return out

    def close(self) -> None:
        """Unregister the pool from the context (idempotent)."""
        if not self._closed:
            self._closed = True
            rc = B.loramux_unregister(self._ctx)
            if rc != B.LORAMUX_OK:
                raise LoramuxError(f"loramux could not unregister adapters {', '.join(self.names)}: {B.reason(rc)} (code {rc})")

    def _raise(self, rc: int, seq_id: int, ids: Sequence[int], weights: Sequence[float], names: Sequence[str] | None) -> None:
        label = list(names) if names is not None else [self._slots[i] or str(i) if 0 <= i < self.n_adapters else str(i) for i in ids]
        mix = ", ".join(f"{n}={w:g}" for n, w in zip(label, weights)) or "(empty)"
        why = self._named(B.reason(rc))
        if rc == B.LORAMUX_ERR_BAD_SEQ_ID:
            raise LoramuxError(f"sequence id {seq_id} is out of range for this context (n_seq_max too small?): {why}")
        if rc == B.LORAMUX_ERR_TOO_MANY_ACTIVE:
            raise MixError(
                f"sequence {seq_id}: mix {mix} has more than max_active={self.max_active} non-zero weights; "
                "drop the smallest weights or register the pool with a larger max_active"
            )
        if rc in (B.LORAMUX_ERR_BAD_ADAPTER_ID, B.LORAMUX_ERR_BAD_WEIGHT, B.LORAMUX_ERR_DUPLICATE_ADAPTER, B.LORAMUX_ERR_BAD_ARG):
            raise MixError(f"sequence {seq_id}: mix {mix}: {why}")
        raise LoramuxError(f"sequence {seq_id}: loramux refused mix {mix}: {why} (code {rc})")

    def __enter__(self) -> "SeqMixer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
