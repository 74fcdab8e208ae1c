"""Native per-sequence mixes on every architecture: one batch of different mixes equals each request alone.

Per architecture (the tiny f32 models of tests/tiny_arch.py, with the two random adapters that
tests/test_architectures.py checks against PEFT), five sequences share every ``llama_decode``:
adapter A alone, the mix 0.6 A + 0.4 B, per-token Arrow routing over both (k=2), the base
model, and SpectR routing (k=2). The oracle is each sequence decoded alone, teacher-forced on
the same tokens: the fixed mixes with stock ``llama_set_adapters_lora`` at the same scales, the
routed ones with their routing on a batch of one. Negative control: a 1.5x scale on sequence 0 must miss the tolerance.

The work runs in a subprocess (``python tests/test_arch_native.py BASE A B OUT``), as in
tests/test_native_oracle.py: loramux.native must load the patched libllama before llama_cpp.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import native_missing, run_worker
from floors import ARCH_BATCH_MAX_ABS

ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral"]
MIXES = [{"a": 1.0}, {"a": 0.6, "b": 0.4}, "arrow", None, "spectr"]
N_PROMPT, N_STEPS = 10, 8


# ---------------------------------------------------------------- worker (subprocess) --
def _worker(base: str, adapter_a: str, adapter_b: str, out: str) -> None:
    from loramux import native

    if not native.available():
        np.savez(out, unavailable=np.array(native.status().reason))
        return
    import llama_cpp

    from loramux.native import teacher
    from loramux.native.mixer import SeqMixer

    with teacher.loaded_model(base, {"a": adapter_a, "b": adapter_b}) as (model, adapters):
        ctx = teacher.new_context(model, n_seq_max=8, n_ctx=8 * 64, n_threads=1)
        with SeqMixer(ctx, adapters, max_active=2) as mixer:
            res = _decode_cases(ctx, mixer, adapters)
        llama_cpp.llama_free(ctx)
    np.savez(out, **res)


def _decode_cases(ctx, mixer, adapters) -> dict[str, np.ndarray]:
    """Each sequence alone (the oracle), then all in one batch, then the negative control."""
    from loramux.native import teacher

    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(4, 500, size=N_PROMPT)] for _ in MIXES]
    res: dict[str, np.ndarray] = {}
    forced = []
    for i, (prompt, mix) in enumerate(zip(prompts, MIXES)):  # the oracle: each alone on seq 0
        _set(mixer, ctx, adapters, 0, mix, stock=True)
        tokens, res[f"alone_{i}"] = teacher.greedy_alone(ctx, prompt, N_STEPS)
        forced.append(tokens)
        _set(mixer, ctx, adapters, 0, None, stock=True)
    seqs = [teacher.ForcedSequence(p, f) for p, f in zip(prompts, forced)]
    for i, mix in enumerate(MIXES):
        _set(mixer, ctx, adapters, i, mix, stock=False)
    for i, logits in enumerate(teacher.decode_forced(ctx, seqs)):
        res[f"batch_{i}"] = logits
    mixer.set(0, {"a": 1.5})  # negative control
    res["wrong_scale_0"] = teacher.decode_forced(ctx, seqs)[0]
    return res


def _set(mixer, ctx, adapters, seq: int, mix, *, stock: bool) -> None:
    """A sequence's mix: routed (per-sequence routing), fixed (stock per-context adapters when alone), or none."""
    from loramux.native import teacher

    if mix in ("arrow", "spectr"):  # per-token routing over both adapters
        mixer.set_routing(seq, mix, 2, 1.0)
    elif stock:
        mixer.clear(seq)
        teacher.set_stock_adapters(ctx, [(adapters[n], w) for n, w in (mix or {}).items()])
    else:
        mixer.set(seq, mix)


# ---------------------------------------------------------------- tests --
@pytest.fixture(scope="module")
def arch_adapters(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """(base GGUF, adapter A, adapter B) per architecture: the two random PEFT adapters, converted by loramux."""
    pytest.importorskip("peft")
    from arch_reference import make_adapter
    from tiny_arch import ensure_built

    from loramux.converters import convert_peft_to_gguf

    tmp = tmp_path_factory.mktemp("arch-native")
    out = {}
    for key, folder in ensure_built(ARCHS).items():
        base = folder / "base-f32.gguf"
        files = [
            convert_peft_to_gguf(
                make_adapter(folder, tmp / f"{key}-{kind}", kind, seed=seed), base, tmp / f"{key}-{kind}.gguf", outtype="f32"
            )
            for kind, seed in (("plain", 1), ("rslora_patterns", 2))
        ]
        out[key] = (base, *files)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_request_alone(arch, arch_adapters, tmp_path):
    out = tmp_path / "res.npz"
    run_worker(__file__, *arch_adapters[arch], out)
    res = np.load(out)
    if "unavailable" in res:
        native_missing(str(res["unavailable"]))
    for i, mix in enumerate(MIXES):
        alone, batch = res[f"alone_{i}"], res[f"batch_{i}"]
        diff = float(np.abs(batch - alone).max())
        print(f"{arch}: sequence {i} ({mix}) batch vs alone max |diff| {diff:.1e}")
        assert diff < ARCH_BATCH_MAX_ABS, f"{arch}: sequence {i} ({mix}) in the batch differs from alone by {diff:.3g}"
    assert np.abs(res["alone_0"] - res["alone_3"]).max() > 10 * ARCH_BATCH_MAX_ABS, f"{arch}: adapter A changes nothing"
    for i in (2, 4):
        assert np.abs(res[f"alone_{i}"] - res["alone_3"]).max() > 10 * ARCH_BATCH_MAX_ABS, f"{arch}: {MIXES[i]} routing changes nothing"
    wrong = float(np.abs(res["wrong_scale_0"] - res["alone_0"]).max())
    print(f"{arch}: 1.5x scale control {wrong:.2f}")
    assert wrong > 10 * ARCH_BATCH_MAX_ABS, f"{arch}: a 1.5x scale is within the tolerance ({wrong:.3g})"


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per architecture, a folder with the two random PEFT adapters named ``a`` and ``b`` (the pool converts them)."""
    pytest.importorskip("peft")
    from arch_reference import make_adapter
    from tiny_arch import ensure_built

    tmp = tmp_path_factory.mktemp("arch-pool")
    out = {}
    for key, folder in ensure_built(POOL_ARCHS).items():
        pool_dir = tmp / key
        make_adapter(folder, pool_dir / "a", "plain", seed=1)
        make_adapter(folder, pool_dir / "b", "rslora_patterns", seed=2)
        out[key] = (folder / "base-f32.gguf", pool_dir)
    return out


POOL_ARCHS = ARCHS
POOL_MIXES = [{"a": 1.0}, {"a": 0.6, "b": 0.4}, "arrow:k=2", None]


@pytest.mark.parametrize("arch", POOL_ARCHS)
def test_pool_answers_a_mixed_batch_as_each_alone(arch, peft_pair):
    """Through the public API: PEFT folders loaded (converted) by the pool, four mixes in one batch."""
    from loramux import AdapterPool, native

    if not native.available():
        native_missing(native.status().reason)
    base, pool_dir = peft_pair[arch]
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(4, 500, size=N_PROMPT)] for _ in POOL_MIXES]
    with AdapterPool(base, n_ctx=512, n_seq_max=4, max_active=2, n_threads=1) as pool:
        pool.load_adapters(pool_dir)
        assert sorted(pool.adapters) == ["a", "b"]
        together = pool.create_completions(prompts, mixes=POOL_MIXES, max_tokens=N_STEPS, temperature=0)
        alone = [pool.create_completions([p], mix=m, max_tokens=N_STEPS, temperature=0)[0] for p, m in zip(prompts, POOL_MIXES)]
    texts = [r["choices"][0]["text"] for r in together]
    assert texts == [r["choices"][0]["text"] for r in alone], f"{arch}: a batched answer differs from the same request alone"
    assert len(set(texts)) > 1, f"{arch}: every mix answers the same: the mixes change nothing"


@pytest.mark.parametrize("arch", POOL_ARCHS)
def test_logo_routes_on_the_real_graph(arch, peft_pair):
    """LoGo reads its scores from the fused op's record at q_proj (Phi-3's fused qkv) and the last prompt token;
    the record's LoGo norms are checked against numpy in tests/test_native_logo.py. Its mix is that row."""
    from loramux import AdapterPool, Mix, native
    from loramux.router.registry import open_router

    if not native.available():
        native_missing(native.status().reason)
    base, pool_dir = peft_pair[arch]
    with AdapterPool(base, n_ctx=512, n_seq_max=2, max_active=2, n_threads=1) as pool:
        pool.load_adapters(pool_dir)
        router = open_router("logo:template=raw,k=2", pool)
        routing = router.route("the quick brown fox")
        tokens = router.tokens("the quick brown fox")
        rows = pool.token_choices(tokens, Mix.logo_token(k=2)).choices
        want = next(c for c in rows if c.module == router.tensor and c.pos == len(tokens) - 1)
        assert set(routing.mix) == {"a", "b"} and dict(routing.mix) == pytest.approx(dict(zip(want.adapters, want.weights)))
        assert routing.top1 == want.adapters[0]
    assert (router.tensor.endswith("attn_qkv.weight")) == (arch == "phi3")


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "phi3"])
def test_eval_answers_as_the_api_does(arch, peft_pair, tmp_path):
    """``loramux eval --mix oracle`` on rows of tasks named after the adapters: each row runs under its
    own task's adapter, and its answer is the one the chat API gives for the same message and mix."""
    import json
    import subprocess
    import sys

    from loramux import AdapterPool, native

    if not native.available():
        native_missing(native.status().reason)
    base, pool_dir = peft_pair[arch]
    rows = [{"task": t, "id": i, "input": f"the quick brown fox {i}", "target": "x"} for i, t in enumerate("abab")]
    data, out = tmp_path / "rows.jsonl", tmp_path / "eval.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "loramux", "eval", "--base", str(base), "--adapters", str(pool_dir), "--data", str(data)]
    cmd += ["--mix", "oracle", "--max-tokens", "6", "--threads", "1", "--n-ctx", "256", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["mix"] for r in report["rows"]] == [{r["task"]: 1.0} for r in rows]
    with AdapterPool(base, n_ctx=256, n_seq_max=2, max_active=2, n_threads=1) as pool:
        pool.load_adapters(pool_dir)
        for row, got in zip(rows, report["rows"]):
            api = pool.create_chat_completion(
                [{"role": "user", "content": row["input"]}], mix={row["task"]: 1.0}, max_tokens=6, temperature=0
            )
            assert got["answer"].strip() == api["choices"][0]["message"]["content"].strip(), f"{arch} row {row['id']}"


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
