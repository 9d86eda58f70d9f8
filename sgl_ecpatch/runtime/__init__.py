"""Expert-choice MoE routing (Zhou et al. 2022) for SGLang, as ../shared/ROUTING.md defines it.

This package depends on torch and the standard library only and uses relative imports
only: ``ecpatch`` copies it verbatim into SGLang trees as
``sglang/srt/layers/moe/expert_choice/``.

Paths, all computing the same function (same ids, bitwise-identical weights):

* ``reference``: the definition in Python loops; the oracle of the tests.
* ``torch``: vectorised PyTorch, CUDA-graph safe (`fast`).
* ``cuda``: the CUDA kernel of ``.kernel`` (built on first use, elsewhere).

`expert_choice_topk` picks one: ``impl`` or, when None, ``$SGLANG_EXPERT_CHOICE_BACKEND``
(default "auto": the CUDA kernel for CUDA inputs when it loads, else the torch path).
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Tuple

import torch

from .config import (
    ENV_BACKEND,
    ENV_LAYERS,
    ENV_MIN_TOKENS,
    ExpertChoiceSettings,
    RoutingPlan,
    capacity,
    capacity_fraction,
    describe_layers,
    parse_layer_spec,
    parse_min_tokens,
    resolve_backend,
    settings_from_env,
    validate,
)
from .fast import expert_choice_topk_torch, run_torch
from .reference import expert_choice_topk_reference, run_reference

__all__ = [
    "expert_choice_topk",
    "expert_choice_topk_reference",
    "expert_choice_topk_torch",
    "ExpertChoiceSettings",
    "capacity",
    "capacity_fraction",
    "describe_layers",
    "parse_layer_spec",
    "parse_min_tokens",
    "settings_from_env",
    "ENV_BACKEND",
    "ENV_LAYERS",
    "ENV_MIN_TOKENS",
]

logger = logging.getLogger(__name__)

_fallback_warned = False
_fallback_lock = threading.Lock()


def _warn_fallback_once(reason: str) -> None:
    """One warning per process when a CUDA input falls back to the torch path."""
    global _fallback_warned
    with _fallback_lock:
        if _fallback_warned:
            return
        _fallback_warned = True
    logger.warning(
        "expert-choice routing: the CUDA kernel is not usable (%s); using the PyTorch path. "
        "Set %s=torch to silence this.",
        reason,
        ENV_BACKEND,
    )


def _run_cuda(
    router_logits: torch.Tensor, plan: RoutingPlan, capacity_factor: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    from .kernel import expert_choice_topk_cuda

    if not isinstance(capacity_factor, (int, float)):  # e.g. a Fraction or numpy.float32
        capacity_factor = float(capacity_factor)
    num_valid = plan.num_valid_tensor if plan.num_valid is None else plan.num_valid
    return expert_choice_topk_cuda(
        router_logits,
        plan.top_k,
        capacity_factor=capacity_factor,
        renormalize=plan.renormalize,
        scoring_func=plan.scoring_func,
        correction_bias=plan.correction_bias,
        num_token_non_padded=num_valid,
        fill=plan.fill,
    )


def _load_kernel(device: torch.device, plan: RoutingPlan):
    """(module or None, reason or None) for this call's device and shape; never raises."""
    try:
        from .kernel import try_load
    except Exception as exc:  # a broken vendored copy must not break routing
        return None, f"cannot import the kernel package: {exc}"
    try:
        module, reason = try_load(device)
    except Exception as exc:
        return None, f"kernel loader failed: {exc}"
    if module is None:
        return None, reason
    supports = getattr(module, "supports", None)
    if supports is not None:
        unsupported = supports(plan.num_experts, plan.top_k)
        if unsupported:
            return None, unsupported
    return module, None


def expert_choice_topk(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    capacity_factor: float = 1.25,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    correction_bias: Optional[torch.Tensor] = None,
    num_token_non_padded=None,
    fill: str = "drop",
    impl: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice top-k: each expert picks its best tokens, then each token keeps k.

    Use it where SGLang's ``TopK`` would run plain top-k (token choice): the output has
    the same shape, so the fused MoE kernels that follow cost the same, and with
    ``fill="drop"`` no expert serves more than ``C = min(n, ceil(n * k * cf / E))``
    tokens, which evens out the load (the point of expert choice).

    Args:
        router_logits: [T, E] float32 / bfloat16 / float16, any device.
        top_k: k, slots per token, 1 <= k <= E.
        capacity_factor: cf > 0, finite; taken as ``Fraction(cf).limit_denominator(1000)``.
        renormalize: divide each row's weights by their sequential float32 sum.
        scoring_func: "softmax" or "sigmoid" over ``router_logits.float()``.
        correction_bias: optional [E]; added to the scores for ranking only.
        num_token_non_padded: None, an int, or a 0-d / 1-element integer tensor n; rows
            t >= n are padding (ids -1, weights 0). A device tensor is never read on
            the host, so the call can be captured in a CUDA graph.
        fill: "drop" (paper semantics: slots of experts that did not choose the token
            are vacant, id -1 / weight 0) or "topk" (they take the token's best other
            experts, as plain top-k would).
        impl: None (read ``$SGLANG_EXPERT_CHOICE_BACKEND``, default "auto"), "auto",
            "cuda", "torch" or "reference". An explicit "cuda" that cannot run raises
            RuntimeError instead of falling back.

    Returns:
        (topk_weights [T, k] float32, topk_ids [T, k] int32) on the input's device.

    Raises:
        ValueError: a bad argument, named with its allowed range.
    """
    backend = resolve_backend(impl)
    plan = validate(
        router_logits,
        top_k,
        capacity_factor=capacity_factor,
        renormalize=renormalize,
        scoring_func=scoring_func,
        correction_bias=correction_bias,
        num_token_non_padded=num_token_non_padded,
        fill=fill,
    )
    if backend == "reference":
        return run_reference(router_logits, plan)
    if backend == "torch":
        return run_torch(router_logits, plan)
    if backend == "cuda":
        if router_logits.device.type != "cuda":
            raise RuntimeError(
                f"impl='cuda' needs router_logits on a CUDA device, got {router_logits.device}"
            )
        module, reason = _load_kernel(router_logits.device, plan)
        if module is None:
            raise RuntimeError(f"impl='cuda' cannot run: {reason}")
        return _run_cuda(router_logits, plan, capacity_factor)
    # auto
    if router_logits.device.type == "cuda":
        module, reason = _load_kernel(router_logits.device, plan)
        if module is not None:
            return _run_cuda(router_logits, plan, capacity_factor)
        _warn_fallback_once(reason or "unknown reason")
    return run_torch(router_logits, plan)
