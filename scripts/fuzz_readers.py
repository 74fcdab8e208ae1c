#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris / libFuzzer) of loramux's file readers, for a bounded time.

Each target feeds the fuzzer's bytes to one reader, through a file (the readers take paths):

    safetensors   converters/safetensors_file.py  read_safetensors(path)
    peft_config   converters/peft_config.py       load_config(folder)       (adapter_config.json)
    peft_adapter  converters/peft_checkpoint.py   load_peft_adapter(folder)
                  (input = adapter_config.json + SEPARATOR + adapter_model.safetensors)
    gguf_header   converters/gguf_header.py       read_gguf_header(path)
    base_gguf     converters/base_gguf.py         read_base_model(path)
    gguf_adapter  plugin/loramux/adapter_file.py  check_gguf_adapter(path, base)  (base: the real base model)

The outcome every input must have: a result, or a clean ``LoramuxError``. Any other exception,
and any input that takes longer than SLOW_S seconds, is a finding: the input is written into
``<corpus>/<target>/`` (crash-*, slow-*; libFuzzer's own timeout-*/oom-* artifacts land there
too) and reported. ``tests/test_fuzz_corpus.py`` replays that corpus without atheris.

Seeds are made from the real fixtures in ../shared (tiny slices of real safetensors, real
adapter_config.json files, a GGUF adapter converted from a fixture, the base GGUF's header
with its vocabulary arrays shortened). The fuzzing itself runs in a child process, restarted
after a hard crash or a libFuzzer timeout, until the time of the target is spent.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "smollm2-bbh-lora"
BAD_FIXTURES = ROOT.parent / "shared" / "fixtures" / "bad-adapters"
DEFAULT_CORPUS = ROOT / "tests" / "fuzz_corpus"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "loramux-fuzz"
TARGETS = ("safetensors", "peft_config", "peft_adapter", "gguf_header", "base_gguf", "gguf_adapter")
SEPARATOR = b"\n--loramux-fuzz: adapter_model.safetensors follows--\n"
SLOW_S = 2.0  # an input slower than this is a finding
HARD_TIMEOUT_S = 20  # libFuzzer kills (and saves) an input stuck this long
RSS_LIMIT_MB = 3072  # libFuzzer saves an input that makes the process this big (oom-*)
MAX_RESTARTS = 50  # child processes per target (each hard crash or timeout ends one)


# ------------------------------------------------------------------ the harness (no atheris here)


def write_input(target: str, data: bytes, workdir: Path) -> Path:
    """Lay ``data`` out as the file (or folder) the target's reader takes; return that path."""
    if target in ("peft_config", "peft_adapter"):
        folder = workdir / "adapter"
        folder.mkdir(parents=True, exist_ok=True)
        config, sep, weights = data.partition(SEPARATOR) if target == "peft_adapter" else (data, b"", b"")
        (folder / "adapter_config.json").write_bytes(config)
        st = folder / "adapter_model.safetensors"
        if sep:
            st.write_bytes(weights)
        elif st.exists():
            st.unlink()
        return folder
    suffix = ".safetensors" if target == "safetensors" else ".gguf"
    path = workdir / f"input{suffix}"
    path.write_bytes(data)
    return path


def call_reader(target: str, path: Path, base: Any = None) -> Any:
    """Run the target's reader on ``path``; ``base`` (a BaseModelInfo) is needed by gguf_adapter."""
    if target == "safetensors":
        from loramux.converters.safetensors_file import read_safetensors

        return read_safetensors(path)
    if target == "peft_config":
        from loramux.converters.peft_config import load_config

        return load_config(path)
    if target == "peft_adapter":
        from loramux.converters.peft_checkpoint import load_peft_adapter

        return load_peft_adapter(path)
    if target == "gguf_header":
        from loramux.converters.gguf_header import read_gguf_header

        return read_gguf_header(path)
    if target == "base_gguf":
        from loramux.converters import base_gguf

        base_gguf._read.cache_clear()  # a rewritten file may keep its size and mtime
        return base_gguf.read_base_model(path)
    if target == "gguf_adapter":
        from loramux.adapter_file import check_gguf_adapter

        if base is None:
            raise SystemExit("the gguf_adapter target needs the base model's BaseModelInfo")
        return check_gguf_adapter(path, base)
    raise SystemExit(f"unknown target {target!r}; one of {', '.join(TARGETS)}")


def replay(target: str, data: bytes, workdir: Path, base: Any = None) -> Any:
    """Feed ``data`` to the target's reader: its result, or whatever it raises."""
    return call_reader(target, write_input(target, data, workdir), base)


def load_base(path: Path | None) -> Any:
    """The BaseModelInfo the gguf_adapter target checks adapters against (default: the embedded base)."""
    from loramux.base_model import default_base_model
    from loramux.converters import read_base_model

    return read_base_model(path or default_base_model())


# ------------------------------------------------------------------ seeds: safetensors


_RAW = {"BF16": "<u2", "F16": "<u2", "F32": "<u4", "F64": "<u8"}  # keep the stored bits as they are


def raw_safetensors(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict | None]:
    """A real safetensors file's tensors as (dtype, raw bit array), and its __metadata__."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    body = 8 + n
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw = np.frombuffer(blob[body + start : body + end], dtype=_RAW[info["dtype"]])
        out[name] = (info["dtype"], raw.reshape(info["shape"]))
    return out, meta


def safetensors_bytes(tensors: dict[str, tuple[str, np.ndarray]], meta: dict | None) -> bytes:
    """Serialise (dtype, raw bits) tensors as a safetensors file, in the layout safetensors writes."""
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    blobs, offset = [], 0
    for name, (dtype, raw) in tensors.items():
        blob = np.ascontiguousarray(raw).tobytes()
        header[name] = {"dtype": dtype, "shape": list(raw.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def tiny_safetensors(folder: Path, keep: int = 8) -> bytes:
    """Layer 0 (and embeddings) of a real checkpoint, each matrix cut to ``keep`` along its non-rank side."""
    tensors, meta = raw_safetensors(folder / "adapter_model.safetensors")
    small = {}
    for name, (dtype, raw) in tensors.items():
        if ".layers.0." not in name and "embed" not in name:
            continue
        if "lora_A" in name or "lora_embedding_A" in name:
            raw = raw[:, :keep]
        else:  # lora_B (out, r), lora_embedding_B (dim, r), magnitude vectors (out,)
            raw = raw[:keep]
        small[name] = (dtype, raw)
    return safetensors_bytes(small, meta)


# ------------------------------------------------------------------ seeds: GGUF


def _value_bytes(vtype: int, value: Any, itype: int | None) -> bytes:
    from gguf import GGUFValueType as T

    from loramux.converters.gguf_header import _scalar_formats

    formats = _scalar_formats()  # the header reader's own table
    if vtype == T.STRING:
        raw = value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    if vtype == T.ARRAY:
        assert itype is not None
        return struct.pack("<IQ", itype, len(value)) + b"".join(_value_bytes(itype, v, None) for v in value)
    return struct.pack(formats[T(vtype)], value)


def gguf_bytes(
    kvs: list[tuple[str, int, Any, int | None]], tensors: list[tuple[str, tuple[int, ...], int, bytes | int]], *, alignment: int = 32
) -> bytes:
    """A GGUF v3 file: (key, value type, value, array item type) metadata, (name, ne, ggml type, data) tensors.

    A tensor whose data is an int (its size in bytes) gets its offset but no bytes: a header-only file.
    """
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kvs))]
    for key, vtype, value, itype in kvs:
        out += [_value_bytes(8, key, None), struct.pack("<I", vtype), _value_bytes(vtype, value, itype)]
    offset, data = 0, []
    for name, ne, ttype, blob in tensors:
        out += [_value_bytes(8, name, None), struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ttype, offset)]
        size = blob if isinstance(blob, int) else len(blob)
        if not isinstance(blob, int):
            data.append(blob + b"\0" * (-size % alignment))
        offset += size + (-size % alignment)
    head = b"".join(out)
    return head + b"\0" * (-len(head) % alignment) + b"".join(data)


def reader_kvs(reader: Any, max_items: int) -> list[tuple[str, int, Any, int | None]]:
    """The metadata of a GGUFReader as gguf_bytes() takes it, arrays cut to ``max_items``."""
    from gguf import GGUFValueType as T

    kvs = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue  # gguf-py's pseudo fields (version, counts)
        vtype = int(field.types[0])
        value = field.contents()
        itype = int(field.types[-1]) if vtype == T.ARRAY else None
        kvs.append((field.name, vtype, value[:max_items] if vtype == T.ARRAY else value, itype))
    return kvs


def compact_base(base_path: Path, keep: Callable[[str], bool]) -> bytes:
    """The real base GGUF's header: every scalar, arrays cut to 8 items, the tensor infos ``keep`` selects, no data."""
    import gguf

    reader = gguf.GGUFReader(base_path)
    tensors = [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes)) for t in reader.tensors if keep(t.name)]
    return gguf_bytes(reader_kvs(reader, 8), tensors)


def tiny_gguf_adapter(base_path: Path, fixture: str, outtype: str, keep: Callable[[str], bool]) -> bytes:
    """A GGUF adapter converted from a real fixture by loramux, reduced to the tensors ``keep`` selects."""
    import gguf

    from loramux.converters import convert_peft_to_gguf

    with tempfile.TemporaryDirectory() as tmp:
        out = convert_peft_to_gguf(FIXTURES / fixture, base_path, Path(tmp) / "a.gguf", outtype=outtype)
        reader = gguf.GGUFReader(out)
        tensors = [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), t.data.tobytes()) for t in reader.tensors if keep(t.name)]
        return gguf_bytes(reader_kvs(reader, 8), tensors)


def build_seeds(target: str, base_path: Path) -> dict[str, bytes]:
    """The seed inputs of a target, all made from the real fixtures (and the real base model)."""
    configs = ["boolean_expressions", "dyck_languages", "object_counting", "word_sorting"]
    adapters = ["boolean_expressions", "object_counting", "word_sorting", "hyperbaton", "sports_understanding"]
    dora = BAD_FIXTURES / "dora_boolean_expressions"
    if target == "safetensors":
        return {f"{n}-layer0.safetensors": tiny_safetensors(FIXTURES / n) for n in adapters}
    if target == "peft_config":
        seeds = {f"{n}.json": (FIXTURES / n / "adapter_config.json").read_bytes() for n in configs}
        seeds["dora.json"] = (dora / "adapter_config.json").read_bytes()
        return seeds
    if target == "peft_adapter":
        folders = {n: FIXTURES / n for n in adapters} | {"dora": dora}
        seeds = {
            f"{n}-layer0.adapter": (f / "adapter_config.json").read_bytes() + SEPARATOR + tiny_safetensors(f) for n, f in folders.items()
        }
        # the DoRA checkpoint with use_dora cleared: its magnitude tensors must still be refused
        config = (dora / "adapter_config.json").read_bytes().replace(b'"use_dora": true', b'"use_dora": false')
        seeds["dora-flag-cleared-layer0.adapter"] = config + SEPARATOR + tiny_safetensors(dora)
        return seeds
    layer0 = re.compile(r"^(token_embd|output_norm|blk\.0\.)").match
    if target in ("gguf_header", "base_gguf"):
        seeds = {"base-header-layer0.gguf": compact_base(base_path, layer0), "base-head-4k.gguf": base_path.read_bytes()[:4096]}
        if target == "base_gguf":
            seeds["base-header-all-tensors.gguf"] = compact_base(base_path, lambda _: True)
        else:
            seeds["adapter-attn_k-f16.gguf"] = tiny_gguf_adapter(base_path, "disambiguation_qa", "f16", re.compile(r"blk\.0\.attn_k").match)
        return seeds
    if target == "gguf_adapter":
        attn_k = re.compile(r"blk\.0\.attn_k").match
        return {f"disambiguation_qa-attn_k-{t}.gguf": tiny_gguf_adapter(base_path, "disambiguation_qa", t, attn_k) for t in ("f16", "q8_0")}
    raise SystemExit(f"unknown target {target!r}")


# ------------------------------------------------------------------ structure-aware mutations
#
# Byte mutations of a JSON header behind a length prefix almost always break the prefix, so the
# readers' type checks are rarely reached. These mutators keep the framing intact and change the
# structure instead: JSON values replaced by values of other types, keys added or dropped; GGUF
# counts, lengths, dimensions, types and offsets overwritten with edge values. One call in five is
# still a plain libFuzzer byte mutation.

_RAW_TOKENS = ["1" * 5000, "[" * 5000 + "]" * 5000, "1e999", "-0", "NaN", "Infinity", "-Infinity"]
_JSON_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    8,
    16,
    2**31,
    2**32,
    2**63,
    2**64,
    -(2**63),
    10**30,
    0.5,
    -0.5,
    1e308,
    "",
    "x",
    "none",
    "all",
    "LORA",
    "BF16",
    "F16",
    "F32",
    "F64",
    "I8",
    "U8",
    "²",
    "[",
    "model.layers.0",
    *(_REGEXES := ["(a+)+$", "(.*.*)*z", "(.|.)*z", ".*.*.*.*.*.*.*z", "q_proj)("]),  # backtracking for ever, invalid
    [],
    [0],
    [1],
    [0, 0],
    [0, 4],
    [4, 0],
    [-1, 4],
    [1, 2, 3],
    [[1]],
    ["1", "2"],
    {},
    {"a": 1},
    {"model.layers.0.self_attn.q_proj": 0},
] + [f"\0raw{i}" for i in range(len(_RAW_TOKENS))]
_JSON_KEYS = [
    "r",
    "lora_alpha",
    "peft_type",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "bias",
    "__metadata__",
    "dtype",
    "shape",
    "data_offsets",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.embed_tokens.lora_embedding_A",
    "model.layers.0.mlp.up_proj.lora_B",
    "x.².lora_A",
    "x." + "1" * 4400 + ".lora_A",
    *_REGEXES,
]


def _json_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every node of a JSON document, as a path of keys / indices."""
    out = [path]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out += _json_paths(v, path + (k,))
    return out


def _json_edit(doc: Any, rnd: Any) -> Any:
    """One structural edit: replace a node, drop or add a key, or splice in a copy of another node."""
    paths = _json_paths(doc)
    path = rnd.choice(paths)
    source = rnd.choice(_JSON_VALUES) if rnd.random() < 0.7 else _json_at(doc, rnd.choice(paths))
    value = copy.deepcopy(source)  # never share a node: edits would make cycles
    if not path:
        return value if rnd.random() < 0.1 else doc
    parent, key = _json_at(doc, path[:-1]), path[-1]
    op = rnd.random()
    if op < 0.15:
        del parent[key]
    elif op < 0.3 and isinstance(parent, dict):
        parent[rnd.choice(_JSON_KEYS + list(parent))] = value
    elif op < 0.4 and isinstance(parent, dict) and isinstance(key, str):
        parent[key[: rnd.randrange(len(key) + 1)] + rnd.choice(["", "1", "²", ".bias", "lora_B", "\udcff"])] = parent.pop(key)
    else:
        parent[key] = value
    return doc


def _json_at(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def mutate_json(text: bytes, rnd: Any, raw_mutate: Callable[[bytes, int], bytes], max_size: int) -> bytes:
    """A structural edit of a JSON document (a byte mutation when it does not parse)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return raw_mutate(text, max_size)
    for _ in range(rnd.randint(1, 3)):
        doc = _json_edit(doc, rnd)
    out = json.dumps(doc, ensure_ascii=rnd.random() < 0.5)
    for i, token in enumerate(_RAW_TOKENS):
        out = out.replace(f'"\\u0000raw{i}"', token).replace(f'"\0raw{i}"', token)
    return out.encode("utf-8", errors="surrogatepass")


def mutate_safetensors(data: bytes, rnd: Any, raw_mutate: Callable[[bytes, int], bytes], max_size: int) -> bytes:
    """Edit the JSON header (and fix the length prefix) or the tensor bytes of a safetensors file."""
    if len(data) < 8:
        return raw_mutate(data, max_size)
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8 : 8 + n], data[8 + n :]
    if rnd.random() < 0.75:
        header = mutate_json(header, rnd, raw_mutate, max_size)
    else:
        body = raw_mutate(body, max(len(body) * 2, 64))
    return struct.pack("<Q", len(header)) + header + body


def gguf_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the integers of a GGUF header: counts, lengths, types, dims, offsets (best effort)."""
    fields, pos = [(8, 8), (16, 8)], 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def u(size: int) -> int:
        nonlocal pos
        fields.append((pos, size))
        value = int.from_bytes(data[pos : pos + size], "little")
        pos += size
        return value

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype in sizes:
            pos += sizes[vtype]
        elif vtype == 8:
            pos += u(8)
        elif vtype == 9:
            itype, count = u(4), u(8)
            for _ in range(min(count, 4)):
                value(itype)
            pos += sizes.get(itype, 0) * max(count - 4, 0)
        else:
            raise ValueError

    try:
        n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
        for _ in range(min(n_kv, 1000)):
            pos += u(8)
            value(u(4))
        for _ in range(min(n_tensors, 1000)):
            pos += u(8)
            n_dims = u(4)
            for _ in range(min(n_dims, 8)):
                u(8)
            u(4), u(8)
    except (ValueError, struct.error):
        pass
    return [(o, n) for o, n in fields if o + n <= len(data)]


def mutate_gguf(data: bytes, rnd: Any, raw_mutate: Callable[[bytes, int], bytes], max_size: int) -> bytes:
    """Overwrite one header integer of a GGUF file with an edge value (a count, a length, a type ...)."""
    fields = gguf_fields(data)
    if not fields:
        return raw_mutate(data, max_size)
    offset, size = rnd.choice(fields)
    old = int.from_bytes(data[offset : offset + size], "little")
    top = (1 << (8 * size)) - 1
    new = rnd.choice(
        [
            0,
            1,
            2,
            3,
            7,
            8,
            9,
            13,
            31,
            33,
            255,
            1 << 16,
            1 << 30,
            1 << 31,
            1 << 32,
            1 << 40,
            1 << 60,
            1 << 63,
            top,
            top - 1,
            len(data),
            len(data) - offset,
            old + 1,
            old - 1,
            old * 2,
            old + (1 << 32),
        ]
    )
    return data[:offset] + (new & top).to_bytes(size, "little") + data[offset + size :]


def make_mutator(target: str) -> Callable[[bytes, int, int], bytes]:
    """libFuzzer's custom mutator for ``target``: structure-aware four times in five, else libFuzzer's own."""
    import random

    import atheris

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        return one(data, max_size, random.Random(seed))[:max_size]

    def one(data: bytes, max_size: int, rnd: random.Random) -> bytes:
        if rnd.random() < 0.2:
            return atheris.Mutate(data, max_size)
        if target in ("gguf_header", "base_gguf", "gguf_adapter"):
            return mutate_gguf(data, rnd, atheris.Mutate, max_size)
        if target == "safetensors":
            return mutate_safetensors(data, rnd, atheris.Mutate, max_size)
        if target == "peft_config":
            return mutate_json(data, rnd, atheris.Mutate, max_size)
        config, sep, weights = data.partition(SEPARATOR)
        if sep and rnd.random() < 0.5:
            return config + sep + mutate_safetensors(weights, rnd, atheris.Mutate, max_size)
        return mutate_json(config, rnd, atheris.Mutate, max_size) + sep + weights

    return mutate


# ------------------------------------------------------------------ the fuzzing child (atheris)


def _signature(exc: BaseException) -> str:
    """Exception type and where it came from (the innermost loramux frame, and the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__

    def where(frame: traceback.FrameSummary) -> str:
        return f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"

    ours = [f for f in frames if "/converters/" in f.filename or "/loramux/" in f.filename]
    inner = where(frames[-1])
    if not ours or where(ours[-1]) == inner:
        return f"{type(exc).__name__} at {inner}"
    return f"{type(exc).__name__} at {where(ours[-1])} (raised in {inner})"


class Finder:
    """libFuzzer's callback: run one input, record any non-LoramuxError exception or slow input."""

    def __init__(self, target: str, findings: Path, stats_path: Path, base: Any) -> None:
        from loramux.converters.errors import LoramuxError

        self.target, self.findings, self.stats_path, self.base = target, findings, stats_path, base
        self.clean_error = LoramuxError
        self.inputs = Path(tempfile.mkdtemp(prefix="loramux-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        self.execs, self.started, self.dumped = 0, time.monotonic(), 0.0
        self.found: dict[str, dict[str, Any]] = {}

    def __call__(self, data: bytes) -> None:
        start = time.perf_counter()
        try:
            replay(self.target, data, self.inputs, self.base)
        except self.clean_error:
            pass
        except Exception as exc:  # noqa: BLE001 - any other exception is what we look for
            self.record("crash", _signature(exc), data, f"{type(exc).__name__}: {exc}"[:500])
        took = time.perf_counter() - start
        if took > SLOW_S:
            self.record("slow", f"slow input ({took:.1f} s)", data, f"took {took:.2f} s", name=hashlib.sha1(data).hexdigest()[:12])
        self.execs += 1
        if time.monotonic() - self.dumped > 1.0:
            self.dump()

    def record(self, kind: str, signature: str, data: bytes, message: str, name: str | None = None) -> None:
        """Keep the smallest input per signature as ``<kind>-<hash>`` in the findings folder."""
        name = f"{kind}-{name or hashlib.sha1(signature.encode()).hexdigest()[:12]}"
        entry = self.found.setdefault(name, {"signature": signature, "message": message, "count": 0})
        entry["count"] += 1
        if entry["count"] == 1:
            print(f"\n[fuzz_readers] FINDING {name}: {signature}: {message}", file=sys.stderr, flush=True)
        path = self.findings / name
        if not path.exists() or len(data) < path.stat().st_size:
            self.findings.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            entry["message"] = message
        self.dump()

    def dump(self) -> None:
        """Write the counters where the parent process reads them (libFuzzer may exit() at any time)."""
        self.dumped = time.monotonic()
        stats = {"execs": self.execs, "seconds": self.dumped - self.started, "findings": self.found}
        self.stats_path.write_text(json.dumps(stats, indent=1))


def worker(args: argparse.Namespace) -> None:
    """The child: instrument loramux (and gguf-py), then let libFuzzer drive Finder."""
    import logging
    import warnings

    import atheris

    with atheris.instrument_imports(include=["loramux", "gguf"]):
        import gguf  # noqa: F401

        import loramux.adapter_file  # noqa: F401
        import loramux.converters  # noqa: F401
    logging.getLogger("gguf").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    base = load_base(args.base) if args.target == "gguf_adapter" else None
    tdir = args.workdir / args.target
    finder = Finder(args.target, args.corpus / args.target, Path(args.stats), base)
    sizes = [p.stat().st_size for p in (tdir / "seeds").iterdir()]
    argv = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        f"-timeout={HARD_TIMEOUT_S}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={args.corpus / args.target}/",
        f"-max_len={max(16384, max(sizes) + 4096)}",
        "-print_final_stats=1",
        str(tdir / "queue"),
        str(tdir / "seeds"),
    ]
    # The findings folder is not fed back: a known hang would stall every restart at its first input.
    atheris.Setup(argv, finder, custom_mutator=make_mutator(args.target))
    atheris.Fuzz()


# ------------------------------------------------------------------ the parent


def prepare(target: str, workdir: Path, corpus: Path, base_path: Path, save_seeds: bool) -> None:
    """Write the target's seeds into the work folder (and, with --save-seeds, into the corpus as seed-*)."""
    tdir = workdir / target
    shutil.rmtree(tdir / "seeds", ignore_errors=True)
    (tdir / "seeds").mkdir(parents=True)
    (tdir / "queue").mkdir(exist_ok=True)
    (corpus / target).mkdir(parents=True, exist_ok=True)  # libFuzzer's -artifact_prefix must exist
    for name, data in build_seeds(target, base_path).items():
        (tdir / "seeds" / name).write_bytes(data)
        if save_seeds:
            (corpus / target / f"seed-{name}").write_bytes(data)


def _child_run(args: argparse.Namespace, target: str, seconds: int, run: int) -> dict[str, Any]:
    """One child process; returns its exit status, counters and the tail of libFuzzer's log."""
    tdir = args.workdir / target
    stats, log = tdir / f"stats-{run}.json", tdir / f"fuzz-{run}.log"
    stats.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--target",
        target,
        "--seconds",
        str(seconds),
        "--corpus",
        str(args.corpus),
        "--workdir",
        str(args.workdir),
        "--stats",
        str(stats),
    ]
    if args.base:
        cmd += ["--base", str(args.base)]
    with log.open("wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    done = re.search(r"stat::number_of_executed_units: (\d+)", text)
    counters = json.loads(stats.read_text()) if stats.exists() else {"execs": 0, "seconds": 0.0, "findings": {}}
    execs = int(done.group(1)) if done else counters["execs"]
    return {"rc": rc, "execs": execs, "seconds": counters["seconds"], "findings": counters["findings"], "tail": text[-1500:]}


def fuzz_target(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """Fuzz one target for args.seconds, restarting the child after hard crashes; return the summary."""
    prepare(target, args.workdir, args.corpus, args.base or load_base_path(), args.save_seeds)
    findings_dir = args.corpus / target
    before = set(os.listdir(findings_dir)) if findings_dir.is_dir() else set()
    deadline, runs = time.monotonic() + args.seconds, []
    while (left := int(deadline - time.monotonic())) >= 3:
        run = _child_run(args, target, left, len(runs))
        runs.append(run)
        print(f"[fuzz_readers] {target}: run {len(runs)} exit {run['rc']}, {run['execs']} executions", file=sys.stderr)
        if run["rc"] == 0:
            break
        print(run["tail"][-800:], file=sys.stderr)
        if run["execs"] == 0 or len(runs) >= MAX_RESTARTS:
            print(f"[fuzz_readers] {target}: giving up (the child does not run; see {args.workdir / target})", file=sys.stderr)
            break
    after = set(os.listdir(findings_dir)) if findings_dir.is_dir() else set()
    queue = list((args.workdir / target / "queue").iterdir())
    found: dict[str, Any] = {}
    for run in runs:
        found.update(run["findings"])
    return {
        "target": target,
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "executions": sum(r["execs"] for r in runs),
        "child_runs": len(runs),
        "exit_codes": [r["rc"] for r in runs],
        "working_corpus_files": len(queue),
        "working_corpus_bytes": sum(p.stat().st_size for p in queue),
        "findings": found,
        "new_corpus_files": sorted(n for n in after - before if not n.startswith("seed-")),
    }


def load_base_path() -> Path:
    """The embedded default base model (fetched with pip on first use)."""
    from loramux.base_model import default_base_model

    return default_base_model()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see --help)."""
    p = argparse.ArgumentParser(
        description="Coverage-guided fuzzing (atheris) of loramux's file readers for a bounded time. Every input must give "
        "a result or a LoramuxError; any other exception, and any input slower than "
        f"{SLOW_S:g} s, is a finding, written into CORPUS/<target>/ and reported. Replay with "
        "`pytest tests/test_fuzz_corpus.py` (no atheris needed).",
        epilog="targets: " + ", ".join(TARGETS) + ". Example: python scripts/fuzz_readers.py --all --seconds 120",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", choices=TARGETS, help="the reader to fuzz")
    which.add_argument("--all", action="store_true", help="fuzz every target, one after the other, --seconds each")
    p.add_argument("--seconds", type=int, default=120, help="fuzzing time per target (default 120)")
    p.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help=f"where findings go, one folder per target (default {DEFAULT_CORPUS.relative_to(ROOT)})",
    )
    p.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"seeds, libFuzzer's working corpus and logs (default {DEFAULT_WORKDIR})"
    )
    p.add_argument(
        "--base", type=Path, default=None, help="base GGUF for seeds and the gguf_adapter target (default: the embedded SmolLM2 base)"
    )
    p.add_argument("--save-seeds", action="store_true", help="also copy the seeds into the corpus as seed-* files")
    p.add_argument("--summary", type=Path, default=None, help="write the summary as JSON here (default WORKDIR/summary.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stats", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Fuzz the chosen targets; exit status 1 when anything was found."""
    args = parse_args(argv)
    args.corpus, args.workdir = args.corpus.resolve(), args.workdir.resolve()
    if args.worker:
        worker(args)
        return 0
    summaries = [fuzz_target(args, t) for t in (TARGETS if args.all else [args.target])]
    summary_path = args.summary or args.workdir / "summary.json"
    summary_path.write_text(json.dumps(summaries, indent=1))
    print("\n| target | seconds | executions | exec/s | working corpus | findings |\n| --- | --- | --- | --- | --- | --- |")
    for s in summaries:
        rate = s["executions"] / s["seconds"] if s["seconds"] else 0.0
        names = "; ".join(f"{n}: {f['signature']} ({f['count']}x)" for n, f in s["findings"].items()) or "none"
        print(
            f"| {s['target']} | {s['seconds']} | {s['executions']} | {rate:.0f} | {s['working_corpus_files']} files, "
            f"{s['working_corpus_bytes']} B | {names} |"
        )
    print(f"summary: {summary_path}")
    return 1 if any(s["findings"] or s["new_corpus_files"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
