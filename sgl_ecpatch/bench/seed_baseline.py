"""The obvious dense PyTorch expert-choice routing: the speed baseline of the benchmarks.

Written from the description of the first public implementation: softmax, a per-expert
``torch.topk`` over the tokens, a dense [T, E] scatter of the chosen scores, a
per-token ``torch.topk`` over that dense matrix, and a second top-k on the scores to
back-fill the slots left empty.

It is a *speed* baseline, not an implementation of ../shared/ROUTING.md. It differs:

* ties go wherever ``torch.topk`` puts them (device- and version-dependent);
* NaN scores rank *above* every number (``torch.topk``'s order), not below;
* the back-fill may repeat an expert the row already holds, and it always fills (there
  is no "drop" policy: every slot gets an expert);
* no padding rows (``num_token_non_padded``), no correction bias, softmax only;
* the capacity is ``ceil(T * k * cf / E)`` in floating point, capped at T;
* renormalisation uses ``sum()``, whose summation order is the device's.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["seed_expert_choice_topk"]


def seed_expert_choice_topk(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    capacity_factor: float = 1.25,
    renormalize: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense expert choice with top-k back-fill. router_logits: [T, E] -> ([T, k] f32, [T, k] i32)."""
    num_tokens, num_experts = router_logits.shape
    scores = torch.softmax(router_logits.float(), dim=-1)
    cap = min(num_tokens, math.ceil(num_tokens * top_k * capacity_factor / num_experts))

    # Each expert picks its `cap` best tokens (top-k down the token axis).
    chosen_scores, chosen_tokens = torch.topk(scores, cap, dim=0)
    # Dense [T, E] matrix holding the score where an expert chose the token, else 0.
    dense = torch.zeros_like(scores).scatter_(0, chosen_tokens, chosen_scores)
    # Each token keeps its k best choosing experts.
    weights, ids = torch.topk(dense, top_k, dim=1)
    # Slots no expert filled (score 0) take the token's own top-k instead.
    fallback_weights, fallback_ids = torch.topk(scores, top_k, dim=1)
    empty = weights <= 0
    ids = torch.where(empty, fallback_ids, ids)
    weights = torch.where(empty, fallback_weights, weights)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
