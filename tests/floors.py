"""Every tolerance the tests compare numbers with, each with where it comes from (not a test module).

A floor is what two correct computations measurably differ by; a tolerance sits above the floor
and below the smallest error a test must catch (each test keeps a negative control that shows it).
"""

from __future__ import annotations

# --- native per-sequence mixes vs the same request alone (tests/test_native_oracle.py) ---------
# Stock llama.cpp is not batch-invariant: on the Q4_1 default model one-ulp differences flip the
# q8 rounding of activations and grow through 30 layers. Measured: stock with the adapter on the
# whole context, the same sequence in a batch of 6 vs alone: max |logit diff| 1.09, mean 0.15;
# loramux in a mixed batch vs stock alone: max 0.78-1.48, mean 0.15-0.23; a 1.5x scale: max 6.2.
BATCH_MAX_ABS = 2.0
BATCH_MEAN_ABS = 0.35
# below this top-two logit gap the batch floor can flip an argmax: greedy tokens are compared only above it
GAP_FLOOR = BATCH_MAX_ABS

# --- the mix op itself vs numpy on its captured inputs (tests/test_native_kernel.py) -----------
# Relative L2 error per token row of the LoRA term. Fused CPU op: f32 accumulation from f16 A and
# f16 B (alpha/r folded in), read back as out - res in f32, so res's rounding shows (measured max
# 2.6e-4 on ffn_up, as with f32 B); mul_mat_id
# form: x rounded to f16 first (ggml's vec_dot type for f16 weights; measured max 9.3e-4). A 10%
# scale error is 0.1 and an adapter dropped at weight 0.3 is >= 0.1: the tests require > 10x the tolerance.
KERNEL_REL_TOL = {"fused": 1e-3, "mul_mat_id": 3e-3}

# --- per-token routing vs numpy's own routing on the captured inputs (tests/test_native_routing.py) --
# Rows whose k-th and (k+1)-th scores lie closer than this fraction of the top score are left out
# of the exact comparison: f32 scores (the device form rounds x to f16) can order them either way.
ROUTE_TIE_MARGIN = 1e-3
# LoGo's weights s / sum(s) in the fused op's record vs numpy's on the captured inputs (tests/test_native_logo.py):
# f32 scores sqrt(t^T G t) / c (t = A x from the f16 A numpy reads too, G = B_s^T B_s in f32); measured max
# |w - w_numpy| 6.5e-8 over 3 calibrations x 4 weights; the controls (rsLoRA at alpha/r, another layer's x) >= 0.29
LOGO_WEIGHT_ATOL = 1e-5

# --- converters vs PEFT's own delta (tests/test_convert_oracle.py) -----------------------------
# max |delta - PEFT delta| / max |PEFT delta| per module, by the GGUF's storage type
CONVERT_REL_TOL = {"f32": 1e-5, "f16": 1e-3, "bf16": 5e-3, "q8_0": 1e-2}

# The same adapter written as f32, f16, bf16, q8_0 (tests/test_convert_llama.py): llama.cpp computes
# the LoRA product in the weight type's precision. Measured |L_type - L_f32| / |L_f32 - L_base|
# at most 0.10 (f16 0.02-0.10, bf16 0.03-0.08, q8_0 0.01-0.07).
CONVERT_OUTTYPE_EFFECT_TOL = 0.2

# --- the ONNX base model vs torch + PEFT (tests/test_onnx_base.py) -----------------------------
# both hold the dequantized weights in f32; only the accumulation order differs (measured 1.5e-3)
ONNX_LOGIT_ATOL = 1e-2

# --- stock llama.cpp logits through the pool's context path (tests/test_pool_oracle.py) --------
POOL_STOCK_LOGIT_TOL = 1e-3  # the same computation (same library, same layout): float noise only
# one request alone twice, with its K/V cells at other places in the cache (measured 0.0098)
POOL_ALONE_LOGPROB_TOL = 0.02

# --- scoring (tests/test_compose.py) -----------------------------------------------------------
SCORE_SAME_TOL = 1e-4  # one batch of many mixes vs one item alone, both per-sequence mixes
SCORE_NLL_TOL = 0.05  # per-sequence mixes vs the mix set on the context (measured 0.03 on 2 target tokens)
# one adapter written merged at weight w ((w B)(w A), a file of its own) vs the output mix at w^2:
# the same delta from other roundings, so the Q4_1 model's activation-rounding floor shows in the
# mean NLL of 2 short examples (measured 0.046 at w = 0.8 and 0.178 at w = 1.3; at w instead of
# w^2 the NLL moves by 0.19 and 0.39)
MERGE_NLL_TOL = 0.25

# --- the hook vs stock llama-server called directly (tests/test_hook.py) -----------------------
HOOK_LOGPROB_TOL = 1e-3

# --- Arrow in llama.cpp vs PEFT's create_arrow_model in torch (tests/test_arrow_peft.py) ----------
# The Q4_1 base rounds activations: the modules' inputs differ from torch's, so scores whose k-th and
# (k+1)-th values lie within this fraction of the top score may order either way (left out).
ARROW_CHOICE_MARGIN = 0.02
# |w_llama.cpp - w_PEFT| of the same chosen adapters, per row: measured median 1.7e-3, max 0.046
# (PEFT at T = 0.5 instead of 1: median 0.052); 44 of 33,304 well-separated top-k sets differ
ARROW_WEIGHT_TOL = {"median": 4e-3, "max": 0.08}
# ||effect_llama.cpp - effect_torch|| / ||effect_torch||, effect = logits(routed or adapter) - logits(base):
# measured 0.246 for one plain adapter (the floor) and 0.257 for Arrow k=3, T=1 over the six
ARROW_EFFECT_REL_TOL = 0.5

# --- every architecture vs torch + PEFT on tiny f32 models (tests/test_architectures.py) ----------
# base GGUF (llama.cpp) vs the transformers model: measured max |logit diff| 2.7e-4 (qwen3) to 6.0e-4 (gemma2/3)
ARCH_BASE_LOGIT_ATOL = 2e-3
# ||E_cpp - E_torch|| / ||E_torch|| of the adapter's effect E on the logits: measured 7.5e-4 (qwen3) to
# 1.23e-3 (gemma2). The negative controls measure 0.23-0.37 (B x1.25), 0.61-0.78 (A/B swapped on
# attn_output) and 0.54-0.95 (q/k row permutation toggled): each must exceed 10x this.
ARCH_EFFECT_REL_TOL = 1e-2
# a sequence in a mixed native batch vs alone on the tiny f32 models (tests/test_arch_native.py):
# max |logit diff| measured 1e-7 to 2.6e-4 over 7 architectures x 4 sequences (f32 weights, 2 layers: no
# Q4 activation rounding to amplify one-ulp differences); a 1.5x scale on one sequence moves them 0.23-0.50
ARCH_BATCH_MAX_ABS = 1e-3
