"""loramux onnx-base / onnx-mix, and the ``--to onnx`` branch of ``loramux convert``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from loramux.base_model import default_base_model
from loramux.errors import LoramuxError
from loramux.progress import progress_bar

# `--outtype` of `loramux convert` -> dtype of the onnxruntime adapter's tensors.
ONNX_OUTTYPES = {"f32": "float32", "f16": "float16"}
ONNX_SUFFIX = ".onnx_adapter"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "onnx-base",
        help="build the base model as an ONNX model with LoRA inputs (for onnxruntime adapters)",
        description=(
            "Build the base GGUF (default: the embedded SmolLM2-135M-Instruct), dequantized to float32, as an "
            "ONNX model whose every linear layer has LoRA graph inputs with empty defaults, named as "
            "onnxruntime-genai's model builder names them (model.layers.N.attn.q_proj.lora_A.MatMul.weight ...). "
            "onnxruntime adapter files from `loramux convert --to onnx` or `loramux onnx-mix` then run on it with "
            "RunOptions.add_active_adapter. The model is cached under the loramux cache folder, keyed by the base "
            "model's fingerprint (about 540 MB for SmolLM2-135M; about a minute to build on 2 cores); the command "
            "prints its path. A genai_config.json beside it makes the folder an onnxruntime-genai model too "
            "(og.Model(folder), og.Adapters). Needs the onnx extra: pip install 'loramux[onnx]'."
        ),
    )
    p.add_argument("--base", type=Path, default=None, help="base model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-o", "--output", type=Path, default=None, help="also copy the model (model.onnx + genai_config.json) into this folder")
    p.add_argument("--rebuild", action="store_true", help="build again even if a cached model exists")
    p.set_defaults(run=run_base)

    m = sub.add_parser(
        "onnx-mix",
        help="write one onnxruntime adapter computing an exact weighted mix of PEFT adapters",
        description=(
            "onnxruntime does not add up two active adapters (one overrides the other). This writes ONE adapter "
            "file whose LoRA paths are the rank concatenations A = [A1 | A2 ...], B = [w1 B1 ; w2 B2 ...], which "
            "computes exactly w1 * delta1(x) + w2 * delta2(x) + ... (PEFT's scaling, rsLoRA and rank/alpha patterns "
            "included). Example: loramux onnx-mix fixtures/a=0.7 fixtures/b=0.3 -o mix.onnx_adapter"
        ),
    )
    m.add_argument(
        "items", nargs="+", metavar="PEFT_DIR=WEIGHT", help="a PEFT LoRA folder and its weight in the mix (finite; may be negative)"
    )
    m.add_argument("-o", "--output", type=Path, required=True, help="output .onnx_adapter file")
    m.add_argument("--base", type=Path, default=None, help="base model GGUF the adapters are checked against (default: the embedded one)")
    m.add_argument(
        "--outtype",
        choices=sorted(ONNX_OUTTYPES),
        default="f32",
        help="tensor type: f32 (loramux's ONNX base, genai CPU builds) or f16 (genai fp16 builds)",
    )
    m.add_argument(
        "--skip-embeddings",
        action="store_true",
        help="drop embedding LoRA (which ONNX models cannot take); the result then differs from PEFT",
    )
    m.set_defaults(run=run_mix)


def run_base(args: argparse.Namespace) -> int:
    from loramux.onnx_base import onnx_base_model

    with progress_bar(desc="build ONNX base", unit="layer") as bar:
        path = onnx_base_model(args.base, rebuild=args.rebuild, progress=bar.update_to)
    if args.output:
        from loramux.converters.atomic import atomic_output
        from loramux.onnx_base import GENAI_CONFIG

        for src in (path.parent / GENAI_CONFIG, path):
            with atomic_output(args.output / src.name) as tmp:
                shutil.copyfile(src, tmp)
        path = args.output / path.name
    print(path)
    return 0


def _parse_items(items: list[str]) -> tuple[dict[str, Path], dict[str, float]]:
    dirs: dict[str, Path] = {}
    weights: dict[str, float] = {}
    for item in items:
        path, sep, value = item.rpartition("=")
        if not sep or not path:
            raise LoramuxError(f"mix item {item!r}: write PEFT_DIR=WEIGHT, e.g. {item}=0.5")
        try:
            weight = float(value)
        except ValueError:
            raise LoramuxError(f"mix item {item!r}: weight {value!r} is not a number") from None
        name = Path(path).name
        if name in dirs:
            raise LoramuxError(f"mix item {item!r}: an adapter named {name!r} is already in the mix")
        dirs[name], weights[name] = Path(path), weight
    return dirs, weights


def run_mix(args: argparse.Namespace) -> int:
    from loramux.converters.onnx_mix import write_onnx_mix

    dirs, weights = _parse_items(args.items)
    write_onnx_mix(
        dirs,
        weights,
        args.base or default_base_model(),
        args.output,
        dtype=ONNX_OUTTYPES[args.outtype],
        skip_embeddings=args.skip_embeddings,
    )
    print(args.output)
    return 0


def convert_to_onnx(args: argparse.Namespace) -> int:
    """``loramux convert PEFT_DIR --to onnx``: one onnxruntime adapter file (default f32)."""
    from loramux.converters.onnx_adapter import convert_peft_to_onnx_adapter

    outtype = args.outtype or "f32"
    if outtype not in ONNX_OUTTYPES:
        raise LoramuxError(f"--outtype {outtype} is not available with --to onnx; use one of {sorted(ONNX_OUTTYPES)}")
    out = args.output or Path(args.peft_dir.name + ONNX_SUFFIX)
    with progress_bar(desc=f"convert {args.peft_dir.name}", unit="module") as bar:
        convert_peft_to_onnx_adapter(
            args.peft_dir,
            args.base or default_base_model(),
            out,
            dtype=ONNX_OUTTYPES[outtype],
            skip_embeddings=args.skip_embeddings,
            allow_pickle=args.allow_pickle,
            progress=bar.update_to,
        )
    print(out, file=sys.stdout)
    return 0
