"""loramux convert: PEFT LoRA folder -> GGUF adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loramux.base_model import default_base_model
from loramux.converters import OUT_TYPES, convert_peft_to_gguf
from loramux.converters.name_map import supported_architectures
from loramux.progress import progress_bar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a PEFT LoRA checkpoint into a GGUF adapter for llama.cpp",
        description=(
            "Convert a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into a GGUF LoRA "
            "adapter that stock llama.cpp loads, with exactly the delta PEFT computes (rsLoRA, rank/alpha "
            "patterns and embedding LoRA included). Only the base GGUF is needed: no Hugging Face config, "
            "no torch. Refuses what llama.cpp cannot express (DoRA, modules_to_save, LoRA bias, "
            "mixture-of-experts experts, ...) and never leaves a partial output file. Base architectures: "
            f"{', '.join(supported_architectures())} (Llama, Mistral and Mixtral are 'llama'; docs/architectures.md)."
        ),
    )
    p.add_argument("peft_dir", type=Path, help="PEFT LoRA folder, as written by save_pretrained()")
    p.add_argument("--base", type=Path, default=None, help="base model GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    p.add_argument(
        "--to",
        choices=["gguf", "onnx"],
        default="gguf",
        help="output format: gguf (llama.cpp, default) or onnx (an onnxruntime .onnx_adapter file, see `loramux onnx-base`; needs the onnx extra)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="output file (default: PEFT_DIR name + .gguf or .onnx_adapter in the current folder)",
    )
    p.add_argument(
        "--outtype",
        choices=OUT_TYPES,
        default=None,
        help="tensor type in the file (gguf default: f16, q8_0 keeps f16 where rows are not multiples of 32; onnx: f32 (default) or f16)",
    )
    p.add_argument(
        "--skip-embeddings",
        action="store_true",
        help="drop an embedding LoRA the base cannot take (tied output); the result then differs from PEFT",
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin, loaded with torch.load(weights_only=True)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.to == "onnx":
        from loramux.cli.onnx_cmd import convert_to_onnx

        return convert_to_onnx(args)
    base = args.base or default_base_model()
    out = args.output or Path(args.peft_dir.name + ".gguf")
    with progress_bar(desc=f"convert {args.peft_dir.name}", unit="module") as bar:
        convert_peft_to_gguf(
            args.peft_dir,
            base,
            out,
            outtype=args.outtype or "f16",
            skip_embeddings=args.skip_embeddings,
            allow_pickle=args.allow_pickle,
            progress=bar.update_to,
        )
    print(out, file=sys.stdout)
    return 0
