"""Routing micro-benchmark: every router that can run here, timed over token counts.

Methods (each is `fn(router_logits [T, E]) -> (topk_weights, topk_ids)`):

- `topk`: plain token choice in PyTorch (softmax in float32, `torch.topk`,
  renormalise): the cost floor that every router is compared with.
- `sglang`: SGLang's own router, where SGLang is importable (its Triton
  `moe_fused_gate` in 0.5.23 on CUDA, else its `fused_topk` variants).
- `seed-ec`: the dense PyTorch expert choice of the first public implementation
  (`sgl_ecpatch.bench.seed_baseline`), the speed baseline.
- `ec-torch-drop`, `ec-torch-topk`: ecpatch's fast PyTorch path, both fills.
- `ec-cuda-drop`, `ec-cuda-topk`: ecpatch's CUDA kernel, where it loads.

A method that cannot run here is listed with the reason instead of a time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import timing
from .distributions import router_logits

ALL_METHODS = ("topk", "sglang", "seed-ec", "ec-torch-drop", "ec-torch-topk", "ec-cuda-drop", "ec-cuda-topk")
DEFAULT_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
CPU_TOKENS = (1, 16, 256, 1024)


@dataclass
class Method:
    name: str
    fn: Callable | None
    reason: str | None = None  # why it cannot run (fn is None)
    capturable: bool = True  # may be timed inside a CUDA graph


def _plain_topk(top_k: int, renormalize: bool):
    def fn(logits):
        scores = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(scores, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids.to(torch.int32)

    return fn


def _sglang_router(top_k: int, renormalize: bool, device: torch.device):
    """SGLang's standard softmax router, or (None, reason)."""
    if device.type == "cuda":
        try:
            from sglang.kernels.ops.moe.moe_fused_gate import moe_fused_gate  # 0.5.23

            def fn(logits):
                return moe_fused_gate(logits, None, top_k, scoring_func="softmax", renormalize=renormalize)

            return fn, None
        except Exception as exc:  # noqa: BLE001 (any import failure means "not here")
            first = f"moe_fused_gate: {type(exc).__name__}: {exc}"
    else:
        first = "SGLang's CUDA router needs a CUDA device"
    try:
        from sglang.srt.layers.moe.topk import fused_topk_torch_native  # CPU / native path
    except Exception as exc:  # noqa: BLE001
        return None, f"{first}; fused_topk_torch_native: {type(exc).__name__}: {exc}"[:300]
    params = inspect.signature(fused_topk_torch_native).parameters

    def fn_native(logits):
        kwargs = {"topk": top_k, "renormalize": renormalize}
        if "correction_bias" in params:
            kwargs["correction_bias"] = None
        hidden = logits.new_empty((logits.shape[0], 1))
        return fused_topk_torch_native(hidden, logits, **kwargs)[:2]

    return fn_native, None


def _seed_baseline(top_k: int, capacity_factor: float):
    try:
        from . import seed_baseline
    except Exception as exc:  # noqa: BLE001
        return None, f"sgl_ecpatch.bench.seed_baseline not importable: {type(exc).__name__}: {exc}"
    named = getattr(seed_baseline, "seed_expert_choice_topk", None)
    candidates = [named] if callable(named) else [getattr(seed_baseline, name) for name in dir(seed_baseline)
                  if not name.startswith("_") and callable(getattr(seed_baseline, name))
                  and getattr(getattr(seed_baseline, name), "__module__", None) == seed_baseline.__name__
                  and ("expert_choice" in name or "seed" in name) and inspect.isfunction(getattr(seed_baseline, name))]
    if not candidates:
        return None, "sgl_ecpatch.bench.seed_baseline has no expert-choice function yet"
    seed_fn = candidates[0]
    params = inspect.signature(seed_fn).parameters

    def fn(logits):
        kwargs = {"capacity_factor": capacity_factor} if "capacity_factor" in params else {}
        return seed_fn(logits, top_k, **kwargs)

    return fn, None


def _ecpatch(top_k: int, renormalize: bool, capacity_factor: float, fill: str, impl: str, device: torch.device):
    try:
        from sgl_ecpatch.runtime import expert_choice_topk
    except Exception as exc:  # noqa: BLE001
        return None, f"sgl_ecpatch.runtime not importable: {type(exc).__name__}: {exc}"
    if impl == "cuda":
        if device.type != "cuda":
            return None, "the CUDA kernel needs a CUDA device"
        try:
            from sgl_ecpatch.runtime.kernel import try_load

            module, reason = try_load(device)
        except Exception as exc:  # noqa: BLE001
            module, reason = None, f"{type(exc).__name__}: {exc}"
        if module is None:
            return None, f"kernel unavailable: {reason}"

    def fn(logits):
        return expert_choice_topk(logits, top_k, capacity_factor=capacity_factor, renormalize=renormalize,
                                  fill=fill, impl=impl)

    return fn, None


def methods_for(top_k: int, *, device: torch.device | str = "cpu", renormalize: bool = True,
                capacity_factor: float = 1.25, names: Iterable[str] = ALL_METHODS) -> list[Method]:
    device = torch.device(device)
    out = []
    for name in names:
        if name == "topk":
            fn, reason = _plain_topk(top_k, renormalize), None
        elif name == "sglang":
            fn, reason = _sglang_router(top_k, renormalize, device)
        elif name == "seed-ec":
            fn, reason = _seed_baseline(top_k, capacity_factor)
        elif name.startswith("ec-"):
            _, impl, fill = name.split("-")
            fn, reason = _ecpatch(top_k, renormalize, capacity_factor, fill, impl, device)
        else:
            raise ValueError(f"unknown routing method {name!r}; known: {', '.join(ALL_METHODS)}")
        out.append(Method(name, fn, reason))
    return out


@dataclass
class RoutingResult:
    experts: int
    top_k: int
    tokens: int
    method: str
    mode: str  # "eager" | "graph"
    us: float | None
    note: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def bench_routing(
    shapes: Iterable[tuple[int, int]],
    tokens: Iterable[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    methods: Iterable[str] = ALL_METHODS,
    modes: Iterable[str] | None = None,
    capacity_factor: float = 1.25,
    rotate: int = 4,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[RoutingResult]:
    """Time every method on every (E, k) shape and token count.

    bf16 logits on CUDA (what SGLang's router GEMM gives), float32 on the CPU by
    default. Modes: eager and graph on CUDA, eager only on the CPU.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if modes is None:
        modes = ("eager", "graph") if device.type == "cuda" else ("eager",)
    modes = tuple(modes)
    results: list[RoutingResult] = []
    methods = tuple(methods)
    for experts, top_k in shapes:
        routers = methods_for(top_k, device=device, capacity_factor=capacity_factor, names=methods)
        for count in tokens:
            inputs = [router_logits(count, experts, "uniform", seed=i, dtype=dtype, device=device)
                      for i in range(rotate)]
            for method in routers:
                for mode in modes:
                    if progress:
                        progress(f"routing E={experts} k={top_k} T={count} {method.name} {mode}")
                    if method.fn is None:
                        results.append(RoutingResult(experts, top_k, count, method.name, mode, None, method.reason))
                        continue
                    try:
                        us = timing.time_fn(method.fn, inputs, device=device, mode=mode, quick=quick)
                        results.append(RoutingResult(experts, top_k, count, method.name, mode, us))
                    except Exception as exc:  # noqa: BLE001 (report, keep going)
                        results.append(RoutingResult(experts, top_k, count, method.name, mode, None,
                                                     f"{type(exc).__name__}: {exc}"[:300]))
                        if device.type == "cuda":
                            torch.cuda.synchronize()
    return results
