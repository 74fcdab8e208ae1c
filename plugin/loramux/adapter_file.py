"""Check a GGUF LoRA adapter file against a base model before llama.cpp sees it.

llama.cpp refuses a misfit adapter only with a log line (and a NULL handle), and accepts one
that later aborts the process (a ``token_embd`` LoRA on a base that ties its output projection
to ``token_embd``). Reading the file's header with gguf-py first gives a clear, typed error
that names the adapter.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from loramux.converters import BaseModelInfo
from loramux.converters.gguf_header import GgufHeaderError, read_gguf_header
from loramux.errors import AdapterError, BaseModelMismatchError, UnsupportedAdapterError

_SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class GgufAdapterFacts:
    """What the pool needs to know about a GGUF adapter file that fits the base."""

    path: Path
    architecture: str
    alpha: float
    n_modules: int
    ranks: tuple[int, ...]
    sha256: str
    adapts_embeddings: bool = False  # has a token_embd LoRA (read from the adapter at decode time)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (adapters are a few MB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapted_weights(path: str | Path) -> frozenset[str]:
    """The base weights (GGUF names, e.g. ``blk.3.attn_q.weight``) that the adapter file adapts."""
    lora_a = _SUFFIXES[0]
    return frozenset(t.name[: -len(lora_a)] for t in read_gguf_header(path).tensors if t.name.endswith(lora_a))


def _kv(reader, key: str):
    import gguf

    field = reader.fields.get(key)
    if field is None or not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return list(field.data)
    return field.parts[field.data[0]].tolist()[0]


def _open_reader(p: Path, label: str):
    """gguf-py's reader on ``p``, after loramux's own header reader has bounded every count by the file size.

    GGUFReader trusts the lengths in the file: a metadata array claiming 2^40 one-byte items makes it
    loop (and allocate) for ever on a 5 KB file. read_gguf_header refuses such a header at once.
    """
    import gguf

    hint = "is the file complete? Convert the PEFT adapter again (loramux convert) if it is damaged"
    try:
        read_gguf_header(p)
    except (OSError, GgufHeaderError) as exc:
        raise AdapterError(f"{label}: cannot read as GGUF ({exc}); {hint}") from exc
    try:
        return gguf.GGUFReader(p, "r")
    except Exception as exc:  # gguf raises ValueError / KeyError / IndexError / numpy errors on bad files
        raise AdapterError(f"{label}: cannot read as GGUF ({type(exc).__name__}: {str(exc)[:200]}); {hint}") from exc


def _alpha(value: object, label: str) -> float:
    """adapter.lora.alpha as a float (0.0 when absent: llama.cpp then applies no alpha/r scale)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(
            f"{label}: adapter.lora.alpha is {value!r}, not a finite number; convert the PEFT adapter again (loramux convert)"
        )
    return float(value)


def _pair_rank(label: str, base: BaseModelInfo, target: str, found: dict[str, tuple[int, ...]]) -> int:
    """Check one .lora_a/.lora_b pair (ggml ne, innermost first) against its base tensor; return its rank."""
    if set(found) != set(_SUFFIXES):
        raise AdapterError(f"{label}: {target!r} has only {sorted(found)} (a LoRA pair needs .lora_a and .lora_b)")
    base_shape = base.tensor_shapes.get(target)
    if base_shape is None or len(base_shape) != 2:
        raise BaseModelMismatchError(
            f"{label} adapts {target!r}, which the base model {base.path.name} does not have "
            f"{'as a matrix' if base_shape else ''}: was it made for another model?"
        )
    a, b = found[".lora_a"], found[".lora_b"]
    if target == "token_embd.weight":
        if base.ties_output_to_embeddings:
            raise UnsupportedAdapterError(
                f"{label} adapts token_embd, but {base.path.name} ties its output projection to token_embd: "
                "llama.cpp would apply the LoRA to the output projection too and abort at the first decode. "
                "Convert the PEFT adapter again with --skip-embeddings (loramux convert / --skip-embeddings on "
                "run, chat and eval), or merge it into the base model"
            )
        # lora_a ne = [r, vocab], lora_b ne = [r, dim]
        ok = len(a) == 2 and len(b) == 2 and base_shape[0] == b[1] and base_shape[1] == a[1] and a[0] == b[0]
        rank = a[0] if len(a) == 2 else -1
    else:  # lora_a ne = [in, r], lora_b ne = [r, out]
        ok = len(a) == 2 and len(b) == 2 and base_shape[0] == a[0] and base_shape[1] == b[1] and a[1] == b[0]
        rank = a[1] if len(a) == 2 else -1
    if ok and rank < 1:
        raise AdapterError(f"{label}: LoRA pair for {target!r} has rank 0 (lora_a {list(a)}, lora_b {list(b)}): a broken file")
    if not ok:
        raise BaseModelMismatchError(
            f"{label}: LoRA pair for {target!r} has lora_a {list(a)} and lora_b {list(b)}, which do not fit "
            f"the base tensor {list(base_shape)} of {base.path.name}: was it made for another model?"
        )
    return int(rank)


def check_gguf_adapter(path: str | Path, base: BaseModelInfo, *, name: str | None = None) -> GgufAdapterFacts:
    """Validate a GGUF LoRA file against ``base``; raise a typed error naming the adapter if it does not fit."""
    p = Path(path)
    label = f"adapter {name!r} ({p})" if name else f"adapter {p}"
    if not p.is_file():
        raise AdapterError(f"{label}: no such file")
    reader = _open_reader(p, label)
    if _kv(reader, "general.type") != "adapter" or _kv(reader, "adapter.type") != "lora":
        raise AdapterError(
            f"{label}: general.type={_kv(reader, 'general.type')!r}, adapter.type={_kv(reader, 'adapter.type')!r}; "
            "expected a GGUF LoRA adapter (general.type='adapter', adapter.type='lora'), e.g. written by `loramux convert`"
        )
    arch = _kv(reader, "general.architecture")
    if arch != base.architecture:
        raise BaseModelMismatchError(
            f"{label} is for architecture {arch!r}, but the base model {base.path.name} is {base.architecture!r}: "
            "convert the adapter against this base, or pass the base it was made for with --base"
        )
    if _kv(reader, "adapter.alora.invocation_tokens") is not None:
        raise UnsupportedAdapterError(
            f"{label} is an activated LoRA (aLoRA), which only acts after its invocation tokens; "
            "it cannot take part in a weighted mix: use plain LoRA adapters"
        )
    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for tname, shape in tensors.items():
        for suffix in _SUFFIXES:
            if tname.endswith(suffix):
                pairs.setdefault(tname[: -len(suffix)], {})[suffix] = shape
                break
        else:
            if not tname.endswith("_norm.weight"):  # llama.cpp skips norm vectors; anything else it rejects
                raise AdapterError(f"{label}: tensor {tname!r} is neither a .lora_a nor a .lora_b tensor")
    if not pairs:
        raise AdapterError(f"{label}: the file holds no LoRA tensors")

    ranks = {_pair_rank(label, base, target, found) for target, found in sorted(pairs.items())}
    alpha = _alpha(_kv(reader, "adapter.lora.alpha"), label)
    return GgufAdapterFacts(
        path=p,
        architecture=str(arch),
        alpha=alpha,
        n_modules=len(pairs),
        ranks=tuple(sorted(ranks)),
        sha256=file_sha256(p),
        adapts_embeddings="token_embd.weight" in pairs,
    )


__all__ = ["GgufAdapterFacts", "check_gguf_adapter", "file_sha256"]
