"""Answer a prompt with onnxruntime alone, on CPU, under an exact mix of LoRA adapters.

What an edge deployment (onnxruntime / DirectML / mobile) would do, end to end:

1. the base model as ONNX with LoRA inputs (`loramux onnx-base`; built once, cached);
2. the mix: from the ONNX router if one is given (``--router router.onnx``), else the fixed
   ``--mix`` (default ``boolean_expressions=0.7,dyck_languages=0.3``);
3. the mix as ONE set of LoRA parameters by rank concatenation (onnxruntime would not add
   two active adapters up), built in memory for this request, or written as an
   ``.onnx_adapter`` file with ``--save-adapter`` (then run with RunOptions.add_active_adapter);
4. greedy decoding with onnxruntime (KV cache, CPU).

Tokenization uses the base GGUF's vocabulary (llama-cpp-python with ``vocab_only=True``: no
llama.cpp inference). Run from the repository root::

    .venv/bin/python examples/onnx_edge.py
    .venv/bin/python examples/onnx_edge.py --prompt "not ( True and False ) or False is" --mix boolean_expressions=1
    .venv/bin/loramux router train --adapters examples/adapters --data ../shared/data/bbh/train.jsonl -o router.onnx
    .venv/bin/python examples/onnx_edge.py --router router.onnx

Needs the onnx extra: pip install 'loramux[onnx]'.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADAPTERS = HERE / "adapters"
IM_END = "<|im_end|>"


def parse_mix(text: str) -> dict[str, float]:
    weights = {}
    for item in text.split(","):
        name, _, value = item.strip().partition("=")
        weights[name] = float(value)
    return weights


def chat_prompt(vocab, user_text: str) -> list[int]:
    """The base model's chat template with one user turn (how the demo adapters were trained)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(vocab.metadata["tokenizer.chat_template"])
    text = template.render(messages=[{"role": "user", "content": user_text}], add_generation_prompt=True)
    return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", default="True and not ( False and True ) is", help="the user's question")
    ap.add_argument(
        "--mix",
        default="boolean_expressions=0.7,dyck_languages=0.3",
        help="fixed mix name=w,... over examples/adapters (used without --router)",
    )
    ap.add_argument("--router", type=Path, default=None, help="an ONNX router file (loramux router train); picks the mix from the prompt")
    ap.add_argument("--adapters", type=Path, default=ADAPTERS, help="folder of PEFT adapters, one sub-folder per adapter")
    ap.add_argument("--save-adapter", type=Path, default=None, help="also write the mix as an .onnx_adapter file and run through it")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from llama_cpp import Llama

    from loramux.base_model import default_base_model
    from loramux.converters.onnx_adapter import write_onnx_adapter
    from loramux.converters.onnx_mix import mix_peft_to_onnx_parameters
    from loramux.onnx_base import OnnxLoraModel, onnx_base_model

    base = default_base_model()
    dirs = {p.name: p for p in sorted(args.adapters.iterdir()) if (p / "adapter_config.json").is_file()}

    t0 = time.perf_counter()
    model_path = onnx_base_model(base)  # builds on first use (about a minute), then cached
    model = OnnxLoraModel(model_path, threads=args.threads)
    t_load = time.perf_counter() - t0

    if args.router is not None:
        from loramux.router import Router

        with Router.load(args.router, base=base, adapters=list(dirs)) as router:
            weights = dict(router.mix_for(args.prompt))
        source = f"router {args.router.name}"
    else:
        weights = parse_mix(args.mix)
        source = "fixed --mix"
    if not weights:
        print("the mix is empty: answering with the base model", file=sys.stderr)

    t0 = time.perf_counter()
    adapter = mix_peft_to_onnx_parameters(dirs, weights, base) if weights else None
    if adapter is not None and args.save_adapter:
        adapter = write_onnx_adapter(adapter, args.save_adapter)
    t_mix = time.perf_counter() - t0

    vocab = Llama(model_path=str(base), vocab_only=True, verbose=False)
    ids = chat_prompt(vocab, args.prompt)
    stop = vocab.tokenize(IM_END.encode(), add_bos=False, special=True)[0]
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_tokens, adapter=adapter, stop_ids=[stop])
    t_gen = time.perf_counter() - t0
    answer = vocab.detokenize(out).decode("utf-8", errors="replace")

    print(f"prompt : {args.prompt}")
    print(f"mix    : {', '.join(f'{k}={v:g}' for k, v in weights.items()) or 'base model'} ({source})")
    print(f"answer : {answer.strip()}")
    print(
        f"timing : model load {t_load:.1f} s, mix build {t_mix * 1000:.0f} ms, "
        f"{len(out)} tokens in {t_gen:.2f} s ({len(ids)}-token prompt, onnxruntime CPU, {args.threads} threads)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
