"""Load-balance study: token choice vs expert choice under skewed routers.

For each router shape, token count and skew (see `distributions`), route the
same logits with token choice, expert choice `drop` and expert choice `topk`,
and record the load numbers of `load.load_stats` plus the projected MoE time of
the slowest EP rank (`timemodel.slowest_rank_us`), twice: for the loads as routed,
and at equal work (`..._equal_work`: every expert's load scaled up so that all T*k
slots are computed, as if the dropped slots had been kept in the same
proportions). The difference is the time that `drop` saves by not computing
slots, which is quality given away, not balance gained. Numbers are means over
`seeds` independent draws. Runs on the CPU (the routing result does not depend
on the device).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .distributions import parse_skew, router_logits
from .load import ROUTING_METHODS, load_stats, route, scores_of, expert_load
from .timemodel import DEFAULT_MODEL, ExpertTimeModel, slowest_rank_us

DEFAULT_RANKS = (1, 2, 4, 8)
DEFAULT_STUDY_TOKENS = (256, 4096)


def study_point(experts: int, top_k: int, tokens: int, skew: str, *, ranks=DEFAULT_RANKS,
                capacity_factor: float = 1.25, seeds: int = 2, model: ExpertTimeModel = DEFAULT_MODEL,
                hidden: int | None = None, inter: int | None = None,
                methods: Iterable[str] = ROUTING_METHODS, renormalize: bool = True,
                device: str | torch.device = "cpu") -> list[dict]:
    """One row per method: mean load numbers over `seeds` draws of the logits (drawn on
    the CPU from the seed, routed on `device`: the result is the same, only faster)."""
    skew_obj = parse_skew(skew)
    ranks = tuple(g for g in ranks if g <= experts)
    sums: dict[str, dict] = {}
    for seed in range(seeds):
        logits = router_logits(tokens, experts, skew_obj, seed=seed, device=device)
        scores = scores_of(logits)
        for method in methods:
            _, ids = route(method, logits, top_k, capacity_factor=capacity_factor, renormalize=renormalize)
            stats = load_stats(method, scores, ids, top_k, ranks=ranks,
                               capacity_factor=None if method == "token-choice" else capacity_factor)
            load = expert_load(ids, experts)
            row = sums.setdefault(method, {"slots_kept": 0.0, "gate_mass": 0.0, "max_mean_expert": 0.0,
                                           "max_expert_load": 0.0, "active_experts": 0.0,
                                           "max_mean_rank": {}, "slowest_rank_us": {},
                                           "slowest_rank_us_equal_work": {}})
            row["slots_kept"] += stats.slots_kept / seeds
            row["gate_mass"] += stats.gate_mass / seeds
            row["max_mean_expert"] += stats.max_mean_expert / seeds
            row["max_expert_load"] += stats.max_expert_load / seeds
            row["active_experts"] += int((load > 0).sum()) / seeds
            assigned = int(load.sum())
            full = load.double() * (tokens * top_k / assigned) if assigned else load.double()
            for g in ranks:
                row["max_mean_rank"][g] = row["max_mean_rank"].get(g, 0.0) + stats.max_mean_rank[g] / seeds
                projected = slowest_rank_us(load, g, model, hidden=hidden, inter=inter)
                row["slowest_rank_us"][g] = row["slowest_rank_us"].get(g, 0.0) + projected / seeds
                equal = slowest_rank_us(full, g, model, hidden=hidden, inter=inter)
                row["slowest_rank_us_equal_work"][g] = row["slowest_rank_us_equal_work"].get(g, 0.0) + equal / seeds
    out = []
    for method, row in sums.items():
        out.append({
            "experts": experts, "top_k": top_k, "tokens": tokens, "skew": skew_obj.label, "method": method,
            "capacity_factor": None if method == "token-choice" else capacity_factor, "seeds": seeds,
            "slots_kept": row["slots_kept"], "gate_mass": row["gate_mass"],
            "max_mean_expert": row["max_mean_expert"], "max_expert_load": row["max_expert_load"],
            # experts with at least one token: each one costs a full read of its weights
            "active_experts": row["active_experts"],
            # JSON object keys are strings; keep them so a table round-trips unchanged
            "max_mean_rank": {str(g): v for g, v in row["max_mean_rank"].items()},
            "slowest_rank_us": {str(g): v for g, v in row["slowest_rank_us"].items()},
            "slowest_rank_us_equal_work": {str(g): v for g, v in row["slowest_rank_us_equal_work"].items()},
            "even_split": {str(g): experts % g == 0 for g in ranks},
        })
    return out


def load_study(shapes: Iterable[tuple[int, int]], tokens: Iterable[int], skews: Iterable[str], *,
               ranks=DEFAULT_RANKS, capacity_factor: float = 1.25, seeds: int = 2,
               model: ExpertTimeModel = DEFAULT_MODEL, sizes: dict | None = None,
               progress: Callable[[str], None] | None = None, device: str | torch.device = "cpu") -> list[dict]:
    """Rows of `study_point` over every shape x token count x skew. `sizes` maps
    (E, k) to (hidden, inter) for the time projection (default: the model's own)."""
    rows = []
    torch.manual_seed(0)
    for experts, top_k in shapes:
        hidden, inter = (sizes or {}).get((experts, top_k), (None, None))
        for count in tokens:
            for skew in skews:
                if progress:
                    progress(f"load E={experts} k={top_k} T={count} {skew}")
                rows.extend(study_point(experts, top_k, count, skew, ranks=ranks, capacity_factor=capacity_factor,
                                        seeds=seeds, model=model, hidden=hidden, inter=inter, device=device))
    return rows
