"""Reference expert-choice routing: ROUTING.md written out step by step.

Clarity first: this loops over experts and tokens in Python and is the oracle that
the fast path and the CUDA kernel are tested against. Only the scores (one torch op
on the whole tensor, see `scoring`) and the float32 arithmetic of the weights are
shared with the other paths, so that "bitwise identical" is a meaningful test.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .config import RoutingPlan, resolve_num_valid_rows_host, validate
from .scoring import ranking_key, routing_scores

__all__ = ["expert_choice_topk_reference", "run_reference"]


def _rank(value: float) -> Tuple[int, float]:
    """Sort key of a ranking-key value: NaN below every number; -0.0 == +0.0 in Python."""
    if math.isnan(value):
        return (0, 0.0)
    return (1, value)


def run_reference(router_logits: torch.Tensor, plan: RoutingPlan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Route with validated arguments (see `expert_choice_topk_reference`)."""
    T, E, k = plan.num_tokens, plan.num_experts, plan.top_k
    device = router_logits.device

    # Step 1: valid rows. A device tensor n is read here: the oracle may sync.
    if plan.num_valid is not None:
        n = plan.num_valid
    else:
        n = resolve_num_valid_rows_host(plan.num_valid_tensor, T)

    # Step 2: scores and ranking key (shared torch ops on the whole [T, E] tensor).
    scores_t = routing_scores(router_logits, plan.scoring_func)
    key_t = ranking_key(scores_t, plan.correction_bias)
    scores: List[List[float]] = scores_t.detach().cpu().tolist()  # float32 -> float: exact
    key: List[List[float]] = key_t.detach().cpu().tolist()

    # Step 3: capacity.
    C = plan.capacity_of(n)

    # Step 4: each expert chooses the C valid tokens with the largest key, ties to the
    # lower token index (sort by key descending, then index ascending).
    chosen_by: List[List[int]] = [[] for _ in range(n)]  # token -> experts that chose it
    for e in range(E):
        tokens = sorted(range(n), key=lambda t: (_rank(key[t][e]), -t), reverse=True)
        for t in tokens[:C]:
            chosen_by[t].append(e)

    ids = torch.full((T, k), -1, dtype=torch.int32)
    weights = torch.zeros((T, k), dtype=torch.float32)
    for t in range(n):
        # Step 5: the token keeps at most k of the experts that chose it, largest key
        # first, ties to the lower expert index.
        by_key = lambda e: (_rank(key[t][e]), -e)  # noqa: E731
        kept = sorted(chosen_by[t], key=by_key, reverse=True)[:k]
        # Step 6: fill policy.
        slots = list(kept)
        if plan.fill == "topk":
            others = sorted((e for e in range(E) if e not in kept), key=by_key, reverse=True)
            slots += others[: k - len(slots)]
        # Step 7: weights are the scores (0 where NaN); missing slots stay vacant (-1, 0).
        row = torch.zeros(k, dtype=torch.float32)
        for j, e in enumerate(slots):
            ids[t, j] = e
            s = scores[t][e]
            row[j] = 0.0 if math.isnan(s) else s
        if plan.renormalize:
            # Sum in slot order in float32 (0-d float32 tensors: IEEE single adds).
            total = torch.zeros((), dtype=torch.float32)
            for j in range(k):
                total = total + row[j]
            if total > 0:
                row = row / total
        weights[t] = row
    # Step 8: rows t >= n keep -1 / 0.
    return weights.to(device), ids.to(device)


def expert_choice_topk_reference(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    capacity_factor: float = 1.25,
    renormalize: bool = True,
    scoring_func: str = "softmax",
    correction_bias: Optional[torch.Tensor] = None,
    num_token_non_padded=None,
    fill: str = "drop",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference expert-choice routing (the oracle); same contract as ``expert_choice_topk``.

    router_logits: [T, E]. Returns (topk_weights [T, k] float32, topk_ids [T, k] int32)
    on the input's device. Slow: loops in Python; for tests and small inputs.
    """
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
    return run_reference(router_logits, plan)
