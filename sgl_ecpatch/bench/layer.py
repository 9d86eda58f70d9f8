"""MoE layer benchmark (CUDA only): router GEMM + routing + fused experts, bf16.

Backends for the experts, first that works:

- `sglang-triton`: SGLang's Triton fused MoE (`fused_experts`) from the installed
  or carried SGLang (0.5.23 API: `moe_runner.triton_utils.fused_moe`). SGLang's
  standard Triton runner reads every id as an expert, so vacant expert-choice
  slots (-1) get the row's first expert with weight 0, which is what an SGLang
  layer must do for that runner (ROUTING.md, "Vacant slots"); the zero-weight
  rows cost the same compute as real ones.
- `torch-grouped-mm`: `torch._grouped_mm` over tokens sorted by expert, every
  group padded to 16 rows, vacant slots skipped. Static shapes: CUDA-graph safe.
- `torch-loop`: one matmul pair per expert with a host sync (eager only); the
  last resort, slow at many experts, and said so in the result.

Weights are random (the time does not depend on their values); hidden states
are random bf16; router logits come from the router GEMM, so they look like a
real router's (no imposed skew: the load study covers skew).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import timing

LAYER_SHAPES = {
    # name: (hidden, inter, experts, top_k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "qwen3-next": (2048, 512, 512, 10),
}
LAYER_TOKENS = (1, 32, 256, 1024, 4096, 16384)
LAYER_METHODS = ("token-choice", "ec-drop", "ec-topk")
ALIGN = 16


@dataclass
class Weights:
    router: torch.Tensor  # [E, H]
    w13: torch.Tensor  # [E, 2I, H]  gate and up, SGLang's layout
    w2: torch.Tensor  # [E, H, I]


def make_weights(hidden: int, inter: int, experts: int, device, seed: int = 0) -> Weights:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(torch.bfloat16)

    return Weights(rand(experts, hidden, scale=hidden**-0.5), rand(experts, 2 * inter, hidden, scale=hidden**-0.5),
                   rand(experts, hidden, inter, scale=inter**-0.5))


def _fill_vacant(weights: torch.Tensor, ids: torch.Tensor):
    """Vacant slots (-1) -> the row's first expert with weight 0 (valid for any runner)."""
    vacant = ids < 0
    first = ids[:, :1].clamp(min=0).expand_as(ids)
    return torch.where(vacant, torch.zeros_like(weights), weights), torch.where(vacant, first, ids)


def grouped_mm_experts(w: Weights) -> Callable:
    experts = w.w13.shape[0]
    w13_t = w.w13.transpose(-2, -1)  # [E, H, 2I], column-major view as _grouped_mm wants
    w2_t = w.w2.transpose(-2, -1)  # [E, I, H]

    def run(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        tokens, k = topk_ids.shape
        slots = tokens * k
        ids = topk_ids.reshape(-1).to(torch.int64)
        ids = torch.where(ids < 0, torch.full_like(ids, experts), ids)  # vacant -> bucket E (never computed)
        counts = torch.zeros(experts + 1, dtype=torch.int64, device=x.device).index_add_(
            0, ids, torch.ones_like(ids))
        padded = (counts + ALIGN - 1) // ALIGN * ALIGN
        start_padded = torch.cumsum(padded, 0) - padded
        start = torch.cumsum(counts, 0) - counts
        order = torch.sort(ids, stable=True).indices
        sorted_ids = ids[order]
        rank_in_expert = torch.arange(slots, device=x.device) - start[sorted_ids]
        dest = start_padded[sorted_ids] + rank_in_expert
        rows = slots + (experts + 1) * ALIGN
        buffer = x.new_zeros(rows, x.shape[1])
        buffer.index_copy_(0, dest, x[order // k])
        offs = torch.cumsum(padded[:experts], 0).to(torch.int32)
        h = torch._grouped_mm(buffer, w13_t, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
        y = torch._grouped_mm(h, w2_t, offs=offs)  # [rows, H]
        slot_weights = topk_weights.reshape(-1)[order].to(y.dtype)
        # rows of bucket E (vacant slots) lie past the last offset: never computed, may hold garbage
        computed = (sorted_ids < experts)[:, None]
        contrib = torch.where(computed, y[dest] * slot_weights[:, None], torch.zeros((), dtype=y.dtype,
                                                                                      device=y.device))
        out = torch.zeros_like(x, dtype=torch.float32)
        out.index_add_(0, order // k, contrib.float())
        return out.to(x.dtype)

    return run


def loop_experts(w: Weights) -> Callable:
    def run(x, topk_weights, topk_ids):
        out = torch.zeros_like(x, dtype=torch.float32)
        flat = topk_ids.reshape(-1)
        for e in torch.unique(flat[flat >= 0]).tolist():
            slot = (flat == e).nonzero().squeeze(1)
            token = slot // topk_ids.shape[1]
            h = x[token] @ w.w13[e].t()
            gate, up = h.chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ w.w2[e].t()
            out.index_add_(0, token, (y * topk_weights.reshape(-1)[slot, None].to(y.dtype)).float())
        return out.to(x.dtype)

    return run


def sglang_triton_experts(w: Weights, top_k: int) -> Callable:
    """SGLang's Triton fused MoE (0.5.23 API); raises when it cannot run here."""
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    try:  # outside a server, SGLang 0.5.23 wants a published runtime context (its TopK does too)
        from sglang.srt.runtime_context import publish_role

        if publish_role() is None:
            from sglang.srt.runtime_context import publish
            from sglang.srt.server_args import ServerArgs

            publish(ServerArgs(model_path="dummy"), role="scheduler")
    except ImportError:
        pass  # older SGLang: no runtime context
    experts = w.w13.shape[0]
    config = MoeRunnerConfig(num_experts=experts, num_local_experts=experts, top_k=top_k,
                             activation="silu", inplace=False)

    def run(x, topk_weights, topk_ids):
        weights, ids = _fill_vacant(topk_weights, topk_ids)
        return fused_experts(x, w.w13, w.w2, StandardTopKOutput(weights, ids, None), config)

    return run


def pick_backend(w: Weights, top_k: int, prefer: str | None = None) -> tuple[str, Callable, list[str]]:
    """(name, fn, notes): the first backend that runs a small check here."""
    notes = []
    device = w.w13.device
    x = torch.randn(8, w.w13.shape[2], device=device, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(w.w13.shape[0], device=device)[:top_k] for _ in range(8)]).to(torch.int32)
    weights = torch.full((8, top_k), 1.0 / top_k, device=device)
    reference = loop_experts(w)(x, weights, ids).float()
    order = ["sglang-triton", "torch-grouped-mm", "torch-loop"]
    if prefer:
        order.remove(prefer)
        order.insert(0, prefer)
    for name in order:
        try:
            fn = {"sglang-triton": lambda: sglang_triton_experts(w, top_k),
                  "torch-grouped-mm": lambda: grouped_mm_experts(w),
                  "torch-loop": lambda: loop_experts(w)}[name]()
            got = fn(x, weights, ids).float()
            if device.type == "cuda":
                torch.cuda.synchronize()
            err = (got - reference).abs().max().item() / max(reference.abs().max().item(), 1e-6)
            if err > 0.05:
                raise RuntimeError(f"result differs from the per-expert loop (relative error {err:.3f})")
            return name, fn, notes
        except Exception as exc:  # noqa: BLE001 (say why, try the next)
            notes.append(f"{name} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    raise RuntimeError("no MoE backend runs here: " + "; ".join(notes))


def router_fns(top_k: int, renormalize: bool = True, capacity_factor: float = 1.25) -> dict[str, Callable]:
    """Routers of the layer: SGLang's where it imports, else plain top-k; expert choice via
    the runtime (impl auto: the kernel where it loads, else the fast PyTorch path)."""
    from .routing import methods_for

    table = {m.name: m for m in methods_for(top_k, device="cuda", renormalize=renormalize,
                                            capacity_factor=capacity_factor,
                                            names=("topk", "sglang", "ec-cuda-drop", "ec-cuda-topk",
                                                   "ec-torch-drop", "ec-torch-topk"))}
    pick = lambda *names: next((table[n] for n in names if table[n].fn is not None), table[names[-1]])  # noqa: E731
    return {"token-choice": pick("sglang", "topk"), "ec-drop": pick("ec-cuda-drop", "ec-torch-drop"),
            "ec-topk": pick("ec-cuda-topk", "ec-torch-topk")}


def bench_layer(shapes=tuple(LAYER_SHAPES), tokens=LAYER_TOKENS, *, methods=LAYER_METHODS, modes=("graph",),
                capacity_factor: float = 1.25, prefer_backend: str | None = None, progress=None,
                quick: bool = False) -> tuple[list[dict], list[str]]:
    """Rows in the measured-table `layer` format, and notes (backends chosen, what was skipped)."""
    if not torch.cuda.is_available():
        return [], ["MoE layer benchmark skipped: no CUDA device"]
    device = torch.device("cuda")
    rows, notes = [], []
    for name in shapes:
        hidden, inter, experts, top_k = LAYER_SHAPES[name]
        w = make_weights(hidden, inter, experts, device)
        backend, experts_fn, backend_notes = pick_backend(w, top_k, prefer_backend)
        notes += [f"{name}: {n}" for n in backend_notes]
        notes.append(f"{name}: experts run with {backend}")
        routers = router_fns(top_k, capacity_factor=capacity_factor)
        for count in tokens:
            xs = [torch.randn(count, hidden, device=device, dtype=torch.bfloat16) for _ in range(2)]
            for method in methods:
                router = routers[method]
                for mode in modes:
                    if progress:
                        progress(f"layer {name} T={count} {method} {mode}")
                    row = {"shape": name, "hidden": hidden, "inter": inter, "experts": experts, "top_k": top_k,
                           "tokens": count, "method": method, "mode": mode, "us": None, "moe_backend": backend,
                           "router": router.name, "note": None}
                    if router.fn is None:
                        row["note"] = router.reason
                        rows.append(row)
                        continue
                    use_mode = "eager" if backend == "torch-loop" else mode

                    def layer(x, router_fn=router.fn):
                        logits = x @ w.router.t()
                        weights, ids = router_fn(logits)
                        return experts_fn(x, weights, ids)

                    try:
                        row["us"] = timing.time_fn(layer, xs, device=device, mode=use_mode, quick=quick)
                        row["mode"] = use_mode
                    except Exception as exc:  # noqa: BLE001
                        row["note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        torch.cuda.synchronize()
                    rows.append(row)
        del w
        torch.cuda.empty_cache()
    return rows, notes


def measure_expert_time(hidden: int = 2048, inter: int = 768, points=None, experts: int | None = None,
                        prefer_backend: str | None = None, device: str | torch.device = "cuda"):
    """Per-expert MoE time vs tokens on this device, for `timemodel`: the fused experts
    (the backend `pick_backend` chooses) over `experts` experts that each get exactly
    n tokens (top-1), divided by the number of experts. CUDA graph on a GPU; on the
    CPU eager, fewer experts and points (CPU times, for CPU advice only)."""
    from .timemodel import ExpertTimeModel

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    points = points or ((1, 8, 32, 128, 512, 2048, 8192) if on_gpu else (1, 8, 32, 128, 512))
    experts = experts or (32 if on_gpu else 4)
    w = make_weights(hidden, inter, experts, device, seed=1)
    backend, experts_fn, _ = pick_backend(w, 1, prefer_backend)
    mode = "graph" if on_gpu and backend != "torch-loop" else "eager"
    measured = []
    for n in points:
        count = n * experts
        x = torch.randn(count, hidden, device=device, dtype=torch.bfloat16)
        ids = (torch.arange(count, device=device) % experts).to(torch.int32)[:, None]
        weights = torch.ones(count, 1, device=device)
        us = timing.time_fn(lambda xi: experts_fn(xi, weights, ids), [x], device=device, mode=mode)
        measured.append((n, us / experts))
        del x
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    return ExpertTimeModel(hidden, inter, measured, "measured", name,
                           f"fused experts ({backend}) over {experts} experts with n tokens each, {mode}, "
                           "divided by the expert count")
