"""Torch + PEFT oracle for Arrow routing (``peft.create_arrow_model``) on the real base and fixtures.

Not a test module: the tests import it, as they import ``peft_reference``.

What PEFT 0.21 computes (``peft/tuners/lora/arrow.py``, ``ArrowLoraLinearLayer.forward``), for
every LoRA-targeted linear module and every token row ``x`` (the module's input, in float32):

    s_e   = |x . v_e|                                   for every adapter e (E of them)
    top   = the top_k adapters by s_e (torch.topk)
    c_e   = softmax over top of s_e / temperature       (0 for adapters outside top)
    delta = sum_e c_e * scaling_e * B_e A_e x           (scaling_e = the adapter's own alpha/r)

where ``v_e`` is the adapter's *prototype*: the top right singular vector of ``B_e A_e``. PEFT
finds it with 15 power iterations from a random start (``top_right_singular_vec_from_BA``);
``arrow_model(..., exact_prototypes=True)`` replaces those by the exact vector (float64 SVD,
cast to the layer dtype) and records the angle between the two per module.

Adapter ordering. PEFT names the task adapters ``task_0, task_1, ...`` in the order of the
paths it is given. ``arrow_model`` passes the fixtures in **sorted fixture-name order**, so
adapter index ``e`` (in prototypes, scores and top-k indices alike) is ``sorted(fixtures)[e]``,
PEFT name ``f"task_{e}"``; ``ArrowInfo.names`` holds that list, ``ArrowInfo.peft_names`` the
PEFT names. No GenKnowSub (``use_gks=False``).

Torch, transformers and PEFT come with the ``train`` extra; without them ``arrow_model`` fails
(never skips), as ``peft_reference`` does.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from peft_reference import _unloaded_after, hf_base_model, one_thread, require_train_extra

ROUTER_ADAPTER = "arrow_router"  # the adapter name create_arrow_model gives the router
TASK_PREFIX = "task_"  # PEFT's names for the task adapters: task_0, task_1, ...

# The fixtures that share r=8, alpha=16 and the q/k/v/o targets (create_arrow_model requires
# one rank, one shape set and one target set across its adapters).
ARROW_FIXTURES = [
    "boolean_expressions",
    "formal_fallacies",
    "logical_deduction_three_objects",
    "penguins_in_a_table",
    "snarks",
    "tracking_shuffled_objects_three_objects",
]


def arrow_fixture_paths(names: list[str] | None = None) -> dict[str, Path]:
    """``{name: PEFT folder}`` under ``../shared/fixtures/smollm2-bbh-lora`` (default: ``ARROW_FIXTURES``)."""
    from conftest import FIXTURES

    return {n: FIXTURES / n for n in (ARROW_FIXTURES if names is None else names)}


@dataclass
class ArrowInfo:
    """What ``arrow_model`` built, attached to the yielded model as ``model.arrow_info``.

    ``names[e]`` is the fixture name of adapter index ``e`` (sorted order); ``peft_names[e]`` is
    PEFT's name for it (``task_{e}``). ``angles[module]`` (E,) is the angle in radians between
    PEFT's power-iteration prototype and the exact top right singular vector of ``B_e A_e``
    (sign-agnostic: ``arccos |cos|``), measured whether or not the exact ones are used.
    ``sigma_ratio[module]`` (E,) is ``sigma_2 / sigma_1`` of ``B_e A_e``: power iteration's angle
    error shrinks roughly as ``ratio ** (2 * 15)``, so a ratio near 1 explains a large angle.
    """

    names: list[str]
    peft_names: list[str]
    top_k: int
    temperature: float
    exact_prototypes: bool
    rng_seed: int | None
    angles: dict[str, np.ndarray] = field(default_factory=dict)
    sigma_ratio: dict[str, np.ndarray] = field(default_factory=dict)
    build_seconds: float = 0.0

    @property
    def max_angle_deg(self) -> float:
        """The largest prototype angle over all modules and adapters, in degrees."""
        return float(np.degrees(max(float(a.max()) for a in self.angles.values())))

    def angle_summary(self) -> str:
        """One line: max / median / 99th percentile angle (degrees) and how many exceed 1 degree."""
        deg = np.degrees(np.concatenate([a.ravel() for a in self.angles.values()]))
        worst = max(self.angles, key=lambda m: float(self.angles[m].max()))
        e = int(self.angles[worst].argmax())
        return (
            f"prototype angle PEFT-vs-exact over {deg.size} (module, adapter) pairs: max {deg.max():.3g} deg "
            f"({worst}, {self.names[e]}, sigma2/sigma1 {self.sigma_ratio[worst][e]:.4f}), "
            f"median {np.median(deg):.3g} deg, p99 {np.percentile(deg, 99):.3g} deg, {int((deg > 1.0).sum())} above 1 deg"
        )


class ArrowChoice(NamedTuple):
    """Arrow's routing of one module, per token (rows in prompt order).

    ``indices`` (t, top_k) int64: adapter indices (into ``ArrowInfo.names``), best score first
    (``torch.topk`` order). ``weights`` (t, top_k) float32: their softmax coefficients, same
    order, summing to 1. ``scores`` (t, E) float32: ``|x . v_e|`` for every adapter, the values
    PEFT ranks (so ``scores`` sorted gives the top-k margin).
    """

    indices: np.ndarray
    weights: np.ndarray
    scores: np.ndarray


def _arrow_layers(model) -> dict[str, object]:
    """HF module name (``model.layers.3.self_attn.q_proj``) -> the LoRA Linear holding an Arrow router."""
    out = {}
    for name, module in model.base_model.model.named_modules():
        arrow = getattr(module, "lora_arrow", None)
        if arrow is not None and ROUTER_ADAPTER in arrow:
            out[name] = module
    if not out:
        raise AssertionError("no Arrow-routed modules in this model")
    return out


def exact_top_right_singular_vector(a, b):
    """Top right singular vector (in_features,) of ``B @ A`` in float64, plus ``sigma_2 / sigma_1``.

    ``A`` (r, in), ``B`` (out, r). With ``A^T = Q R`` (Q: in x r orthonormal), ``B A = (B R^T) Q^T``,
    so the SVD of the small ``B R^T = U S W^T`` gives the right singular vectors ``Q W``.
    """
    import torch

    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    q, r = torch.linalg.qr(a64.T)  # (in, r), (r, r)
    _, s, wh = torch.linalg.svd(b64 @ r.T)
    v = q @ wh[0]
    ratio = float(s[1] / s[0]) if s.numel() > 1 and float(s[0]) > 0 else 0.0
    return v / torch.linalg.vector_norm(v), ratio


@contextmanager
def arrow_model(
    base: str | os.PathLike,
    fixtures: dict[str, Path],
    *,
    top_k: int,
    temperature: float,
    exact_prototypes: bool = True,
    rng_seed: int | None = 0,
) -> Iterator:
    """A PEFT Arrow model (``create_arrow_model``, task adapters only) over ``fixtures`` on the
    shared real base (``peft_reference.hf_base_model``), float32, eval mode.

    Adapters are loaded in ``sorted(fixtures)`` order: index ``e`` is ``task_{e}``. Prototypes are
    built eagerly (PEFT's own ``build_prototypes``, power iteration seeded with ``rng_seed``); with
    ``exact_prototypes`` every router's ``prototypes`` buffer is then replaced by the exact top
    right singular vectors (float64, cast to the layer dtype). Either way the angles between the
    two are recorded in ``model.arrow_info`` (an ``ArrowInfo``). On exit the LoRA layers are
    removed from the shared base, so later ``peft_model`` calls see a clean model.
    """
    require_train_extra()
    import torch
    from peft import ArrowConfig, create_arrow_model

    names = sorted(fixtures)
    start = time.perf_counter()
    base_model = hf_base_model(str(base))
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=False, rng_seed=rng_seed)
    model = create_arrow_model(base_model, [str(fixtures[n]) for n in names], config)
    info = ArrowInfo(
        names=names,
        peft_names=[f"{TASK_PREFIX}{e}" for e in range(len(names))],
        top_k=top_k,
        temperature=temperature,
        exact_prototypes=exact_prototypes,
        rng_seed=rng_seed,
    )
    with _unloaded_after(base_model, model) as wrapped:
        assert list(config.task_adapter_names) == info.peft_names, config.task_adapter_names
        with torch.no_grad(), one_thread():
            for module_name, module in _arrow_layers(wrapped).items():
                router = module.lora_arrow[ROUTER_ADAPTER]
                assert router.task_adapter_names == info.peft_names, (module_name, router.task_adapter_names)
                router.build_prototypes(module.lora_A, module.lora_B)
                peft_protos = router.prototypes.detach().to(torch.float64)
                exact, ratios, angles = [], [], []
                for e, task in enumerate(info.peft_names):
                    v, ratio = exact_top_right_singular_vector(module.lora_A[task].weight, module.lora_B[task].weight)
                    p = peft_protos[e] / torch.linalg.vector_norm(peft_protos[e])
                    angles.append(float(torch.arccos(torch.clamp(torch.abs(p @ v), max=1.0))))
                    exact.append(v)
                    ratios.append(ratio)
                info.angles[module_name] = np.array(angles)
                info.sigma_ratio[module_name] = np.array(ratios)
                if exact_prototypes:
                    router.prototypes = torch.stack(exact).to(dtype=router.prototypes.dtype, device=router.prototypes.device)
        info.build_seconds = time.perf_counter() - start
        wrapped.arrow_info = info
        try:
            yield wrapped
        finally:
            del wrapped.arrow_info


def arrow_info(model) -> ArrowInfo:
    """The ``ArrowInfo`` that ``arrow_model`` attached to ``model``."""
    return model.arrow_info


def _forward(model, tokens: list[int], capture: bool):
    """Teacher-forced forward on one thread: logits (t, vocab) and, when ``capture``, per Arrow
    module the router's input ``x`` (t, in) and PEFT's delta (t, out), as torch tensors."""
    import torch

    inputs: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    handles = []
    if capture:
        for name, module in _arrow_layers(model).items():

            def hook(_mod, args, out, name=name):
                inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
                deltas[name] = out.detach().reshape(-1, out.shape[-1]).clone()

            handles.append(module.lora_arrow[ROUTER_ADAPTER].register_forward_hook(hook))
    try:
        with torch.inference_mode(), one_thread():
            ids = torch.tensor([list(tokens)], dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, inputs, deltas


def arrow_logits(model, tokens: list[int]) -> np.ndarray:
    """Teacher-forced logits (n_tokens, n_vocab) float32 of the Arrow model on ``tokens`` (one sequence)."""
    import torch

    logits, _, _ = _forward(model, tokens, capture=False)
    return logits.to(torch.float32).numpy().copy()


def _route(router, x):
    """PEFT's routing of the rows ``x`` (t, in), in the layer dtype, exactly as ``ArrowLoraLinearLayer.forward``."""
    import torch

    sim = torch.abs(x @ router.prototypes.T)  # (t, E)
    top_v, idx = torch.topk(sim, router.top_k, dim=1)
    full = x.new_full(sim.shape, float("-inf"))
    full.scatter_(1, idx, top_v)
    coeff = torch.softmax(full / router.temperature, dim=1)  # (t, E)
    return sim, idx, coeff


def arrow_choices(model, tokens: list[int]) -> dict[str, ArrowChoice]:
    """Per Arrow-routed module (HF name, e.g. ``model.layers.3.self_attn.q_proj``), the per-token
    routing: an ``ArrowChoice`` (top-k adapter indices into ``ArrowInfo.names``, their softmax
    weights, and ``|x . v_e|`` for all adapters).

    The module inputs ``x`` are captured with forward hooks on PEFT's own forward, and the routing
    is recomputed from them with PEFT's formula in the layer dtype (float32), so the top-k sets
    are the ones PEFT used.
    """
    import torch

    _, inputs, _ = _forward(model, tokens, capture=True)
    layers = _arrow_layers(model)
    out: dict[str, ArrowChoice] = {}
    with torch.inference_mode(), one_thread():
        for name, x in inputs.items():
            router = layers[name].lora_arrow[ROUTER_ADAPTER]
            sim, idx, coeff = _route(router, x.to(router.prototypes.dtype))
            out[name] = ArrowChoice(
                indices=idx.numpy().astype(np.int64),
                weights=torch.gather(coeff, 1, idx).to(torch.float32).numpy().copy(),
                scores=sim.to(torch.float32).numpy().copy(),
            )
    return out


def arrow_prototypes(model) -> dict[str, np.ndarray]:
    """HF module name -> the (E, in_features) prototypes the router uses (rows in adapter-index order)."""
    import torch

    return {
        name: m.lora_arrow[ROUTER_ADAPTER].prototypes.detach().to(torch.float32).numpy().copy() for name, m in _arrow_layers(model).items()
    }


def check_against_peft_forward(model, tokens: list[int]) -> float:
    """Max abs difference, over every Arrow module and token, between the delta PEFT's forward
    added and ``sum_e c_e * scaling_e * B_e A_e x`` recomputed here in float64 from the captured
    input ``x`` (top-k set from PEFT's float32 scores; coefficients, products and sum in float64).
    """
    import torch

    _, inputs, deltas = _forward(model, tokens, capture=True)
    layers = _arrow_layers(model)
    info = arrow_info(model)
    worst = 0.0
    with torch.inference_mode(), one_thread():
        for name, x in inputs.items():
            module = layers[name]
            router = module.lora_arrow[ROUTER_ADAPTER]
            _, idx, _ = _route(router, x.to(router.prototypes.dtype))
            x64 = x.to(torch.float64)
            sim64 = torch.abs(x64 @ router.prototypes.to(torch.float64).T)
            full = torch.full_like(sim64, float("-inf"))
            full.scatter_(1, idx, torch.gather(sim64, 1, idx))
            coeff = torch.softmax(full / router.temperature, dim=1)  # (t, E)
            want = torch.zeros(x64.shape[0], deltas[name].shape[-1], dtype=torch.float64)
            for e, task in enumerate(info.peft_names):
                a = module.lora_A[task].weight.to(torch.float64)
                b = module.lora_B[task].weight.to(torch.float64)
                want += coeff[:, e : e + 1] * float(module.scaling[task]) * ((x64 @ a.T) @ b.T)
            worst = max(worst, float(torch.max(torch.abs(deltas[name].to(torch.float64) - want))))
    return worst
