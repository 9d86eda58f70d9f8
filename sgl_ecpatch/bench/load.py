"""Load accounting: expert load, expert-parallel rank load, gate mass retained.

Conventions (the same as SGLang's expert parallelism): with G ranks, rank r
holds the contiguous experts `[r*E/G, (r+1)*E/G)`. When G does not divide E
(60 experts over 8 ranks) SGLang refuses to start; here the experts are split as
evenly as possible (chunk sizes differ by at most one, like `torch.tensor_split`)
and the result says `even_split: false`.

A slot with id -1 (vacant, or a padding row) is no load. "max/mean" is the
largest load over the mean load; 1.0 is perfect balance, and an all-empty load
counts as balanced (1.0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..runtime.scoring import routing_scores

ROUTING_METHODS = ("token-choice", "ec-drop", "ec-topk")


def expert_load(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`topk_ids: [T, k]` (ids < 0 are vacant) -> int64 `[E]` slot count per expert."""
    ids = topk_ids.reshape(-1).to(torch.int64).cpu()
    valid = ids[(ids >= 0) & (ids < num_experts)]
    if valid.numel() != int((ids >= 0).sum()):
        raise ValueError(f"topk_ids hold an expert id >= num_experts ({num_experts})")
    return torch.bincount(valid, minlength=num_experts)


def rank_slices(num_experts: int, ranks: int) -> list[range]:
    """The experts of each EP rank: contiguous, sizes differing by at most one."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if ranks > num_experts:
        raise ValueError(f"cannot split {num_experts} experts over {ranks} ranks")
    base, extra = divmod(num_experts, ranks)
    out, start = [], 0
    for r in range(ranks):
        size = base + (1 if r < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def rank_load(load: torch.Tensor, ranks: int) -> torch.Tensor:
    """Per-expert load `[E]` -> per-rank load `[G]`."""
    return torch.stack([load[s.start:s.stop].sum() for s in rank_slices(load.numel(), ranks)])


def max_over_mean(values: torch.Tensor) -> float:
    values = values.to(torch.float64)
    mean = float(values.mean()) if values.numel() else 0.0
    if mean <= 0.0:
        return 1.0
    return float(values.max()) / mean


def gate_mass_retained(scores: torch.Tensor, topk_ids: torch.Tensor, top_k: int) -> float:
    """Sum of the scores of the assigned (token, expert) slots over the sum of the
    plain top-k scores: 1.0 for token choice, < 1 when expert choice moves or drops
    slots. `scores: [T, E]` (softmax/sigmoid, before renormalisation)."""
    scores = scores.float().cpu()
    ids = topk_ids.to(torch.int64).cpu()
    if scores.shape[0] == 0:
        return 1.0
    kept = torch.where(ids >= 0, scores.gather(1, ids.clamp(min=0)), torch.zeros((), dtype=scores.dtype))
    best = scores.topk(top_k, dim=1).values
    denominator = float(best.double().sum())
    return float(kept.double().sum()) / denominator if denominator > 0 else 1.0


@dataclass
class LoadStats:
    method: str
    tokens: int
    experts: int
    top_k: int
    capacity_factor: float | None
    slots_kept: float  # assigned slots / (T * k)
    gate_mass: float
    max_expert_load: int
    max_mean_expert: float
    max_mean_rank: dict[int, float] = field(default_factory=dict)
    max_rank_load: dict[int, int] = field(default_factory=dict)
    even_split: dict[int, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_stats(
    method: str,
    scores: torch.Tensor,
    topk_ids: torch.Tensor,
    top_k: int,
    *,
    ranks=(1, 2, 4, 8),
    capacity_factor: float | None = None,
) -> LoadStats:
    """Every load number of one routing result. `scores: [T, E]`, `topk_ids: [T, k]`."""
    tokens, experts = scores.shape
    load = expert_load(topk_ids, experts)
    stats = LoadStats(
        method=method,
        tokens=tokens,
        experts=experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        slots_kept=float(load.sum()) / (tokens * top_k) if tokens else 1.0,
        gate_mass=gate_mass_retained(scores, topk_ids, top_k),
        max_expert_load=int(load.max()) if experts else 0,
        max_mean_expert=max_over_mean(load),
    )
    for g in ranks:
        if g > experts:
            continue
        per_rank = rank_load(load, g)
        stats.max_mean_rank[g] = max_over_mean(per_rank)
        stats.max_rank_load[g] = int(per_rank.max())
        stats.even_split[g] = experts % g == 0
    return stats


def scores_of(router_logits: torch.Tensor, scoring_func: str = "softmax") -> torch.Tensor:
    """Router scores S [T, E] float32, computed exactly as the routing computes them."""
    return routing_scores(router_logits, scoring_func)


def token_choice(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True):
    """Plain top-k routing (what SGLang's standard softmax router computes)."""
    scores = scores_of(router_logits)
    weights, ids = scores.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return weights, ids.to(torch.int32)


def route(method: str, router_logits: torch.Tensor, top_k: int, *, capacity_factor: float = 1.25,
          renormalize: bool = True, impl: str = "torch"):
    """`token-choice`, `ec-drop` or `ec-topk` -> (topk_weights, topk_ids)."""
    if method == "token-choice":
        return token_choice(router_logits, top_k, renormalize=renormalize)
    if method in ("ec-drop", "ec-topk"):
        from sgl_ecpatch.runtime import expert_choice_topk

        return expert_choice_topk(router_logits, top_k, capacity_factor=capacity_factor,
                                  renormalize=renormalize, fill=method[3:], impl=impl)
    raise ValueError(f"unknown routing method {method!r}; use one of {', '.join(ROUTING_METHODS)}")
