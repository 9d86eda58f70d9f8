"""Fast expert-choice routing in PyTorch: vectorised and CUDA-graph safe.

Same results as `reference` (same ids, bitwise-identical weights) with a fixed
number of torch ops whatever T and E are: no Python loop over tokens or experts
(only over the k slots when renormalising, in slot order, see `scoring`), no
``.item()``, no ``nonzero`` or boolean indexing, and only shapes known on the host,
also when ``num_token_non_padded`` is a device tensor.

How it works:

1. ``K = total_order_key(...)``: every ``(t, e)`` gets a unique int64 key that orders
   by the ranking key (NaN lowest, -0.0 == +0.0) and then by the lower index, in
   columns and in rows alike. So ``torch.topk`` on K is exact and its ties cannot
   depend on the device or the library version.
2. Expert choice: ``topk(K, C, dim=0)`` picks each expert's tokens. Padding rows are
   excluded by slicing (n on the host) or by giving them the NaN rank (n on the
   device: they tie with NaN rows and lose on the index, and ``C(n) <= n``). With n on
   the device the capacity ``C(n)`` is data-dependent, so the selection takes the
   static bound ``C(T)`` sorted and keeps ranks ``r < C(n)``, computed on the device.
3. Chosen entries are lifted by 2**62 (|K| < 2**61, so lifted keys are >= 2**61 and
   every other key is below), so one row-wise ``topk(k)`` lists a token's kept
   experts first, in key order, then its best other experts: exactly the slot list
   of ``fill="topk"``; ``fill="drop"`` makes the unlifted slots vacant.
4. Weights are gathered from the scores, NaN -> 0, vacant -> 0, then renormalised by
   the shared sequential sum.

Shortcuts decided on the host: when no expert can be full (``C(m) == m`` for every
possible n, e.g. a single row) step 2 is skipped and the result is plain top-k.

Cost: two int64 selections (experts over tokens, then tokens over experts) plus about
15 small elementwise kernels; `ROW_SELECT` and `COLUMN_LAYOUT` pick between layouts
that give the same bits (see `run_torch`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import RoutingPlan, validate
from .scoring import (
    INT32_MIN,
    KEY_BOUND,
    TIER,
    nonnegative_ordered_int32,
    ordered_int32,
    ranking_key,
    TIE_SHIFT,
    renormalize_rows,
    routing_scores,
    tie_break_table,
    total_order_key,
)

__all__ = ["expert_choice_topk_torch", "run_torch"]


def _everyone_chosen(plan: RoutingPlan) -> bool:
    """True when C(m) == m for every n the call can see: no expert is ever full."""
    kp = plan.top_k * plan.cf.numerator
    eq = plan.num_experts * plan.cf.denominator
    if plan.num_valid is not None:
        n = plan.num_valid
        return n == 0 or n * kp > eq * (n - 1)  # ceil(n*kp/eq) >= n
    T = plan.num_tokens
    # ceil(m * x) >= m for all 1 <= m <= T  <=>  x > (T - 1) / T
    return T * kp > eq * (T - 1)


def _empty_result(plan: RoutingPlan, device) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = (plan.num_tokens, plan.top_k)
    return (
        torch.zeros(shape, dtype=torch.float32, device=device),
        torch.full(shape, -1, dtype=torch.int32, device=device),
    )


ROW_SELECT = "topk"
COLUMN_LAYOUT = "tokens"


@torch.no_grad()
def run_torch(
    router_logits: torch.Tensor,
    plan: RoutingPlan,
    *,
    row_select: Optional[str] = None,
    column_layout: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Route with validated arguments (see `expert_choice_topk_torch`).

    Two layout choices give the same bits (the keys are unique) and only differ in
    speed, which depends on E, T and the device (``benchmarks/routing_torch.py`` times
    them):

    * ``row_select`` ("topk" or "sort", default `ROW_SELECT`): each row's k slots from
      ``torch.topk(k)`` or from a full row ``torch.sort`` cut to k.
    * ``column_layout`` ("tokens" or "experts", default `COLUMN_LAYOUT`): the experts'
      selection runs down the columns of the [T, E] key, or along the rows of an
      [E, T] copy (contiguous reads, one extra transpose back for the row stage).

    Runs under ``no_grad``: like the reference, the weights carry no autograd history.
    """
    T, E, k = plan.num_tokens, plan.num_experts, plan.top_k
    device = router_logits.device
    n_host = plan.num_valid
    if T == 0 or n_host == 0:
        return _empty_result(plan, device)

    scores = routing_scores(router_logits, plan.scoring_func)
    if plan.correction_bias is None:
        ordered = nonnegative_ordered_int32(scores)
    else:
        ordered = ordered_int32(ranking_key(scores, plan.correction_bias))

    # Rows that are valid, as a [T, 1] device mask, only when n lives on the device.
    # n is compared, never multiplied, so it needs no clamp and no cast (an int32 n
    # cannot overflow): t < n and the rank test below hold for clamp(n, 0, T) alike.
    row_valid: Optional[torch.Tensor] = None
    n_dev: Optional[torch.Tensor] = None
    if n_host is None:
        n_dev = plan.num_valid_tensor
        if n_dev.device != device:
            n_dev = n_dev.to(device)
        row_valid = torch.arange(T, device=device).unsqueeze(1) < n_dev
        # Padding rows take the NaN rank: below every valid row with a number, and
        # tied with NaN rows, which win on the lower index. As C(n) <= n, no padding
        # row is ever among an expert's first C(n) tokens.
        ordered = torch.where(row_valid, ordered, INT32_MIN)

    everyone = _everyone_chosen(plan)
    max_capacity = plan.max_capacity if n_host is None else plan.host_capacity
    if everyone or max_capacity == 0:
        # No selection to make: every expert takes every valid token (kept = plain
        # top-k), or none takes any (C == 0, only possible for cf < 1/2000).
        row_key = total_order_key(ordered)
        lifted_all = everyone
    else:
        lifted_all = False
        by_expert = (column_layout or COLUMN_LAYOUT) == "experts"
        if by_expert:
            # [E, T] contiguous: each expert's candidates are one contiguous row.
            key = torch.empty((E, T), dtype=torch.int64, device=device)
            torch.add(tie_break_table(E, T, device), ordered.t(), alpha=TIE_SHIFT, out=key)
            token_dim = 1
        else:
            key = total_order_key(ordered)
            token_dim = 0
        if n_host is not None:
            column_key = key if n_host == T else key.narrow(token_dim, 0, n_host)
            vals, token_idx = torch.topk(column_key, max_capacity, dim=token_dim, sorted=False)
            lifted = vals + TIER
        else:
            # Here C(n) = ceil(n * kp / eq) with kp < eq (else everyone is chosen), and
            # rank r (0-based, sorted) is kept  <=>  r < ceil(n*kp/eq)
            #   <=>  r*eq < n*kp  <=>  floor(r*eq / kp) < n   (n an integer).
            kp = k * plan.cf.numerator
            eq = E * plan.cf.denominator
            if max_capacity * eq >= 2**62:
                raise ValueError(f"router_logits is too large for exact capacity arithmetic: T = {T}, E = {E}")
            vals, token_idx = torch.topk(key, max_capacity, dim=token_dim, sorted=True)
            rank_floor = torch.arange(0, max_capacity * eq, eq, dtype=torch.int64, device=device) // kp
            rank_kept = rank_floor.unsqueeze(1 - token_dim) < n_dev
            lifted = torch.add(vals, rank_kept, alpha=TIER)
        # key is our own temporary: lift in place (one kernel, no copy).
        key.scatter_(token_dim, token_idx, lifted)
        row_key = key.t().contiguous() if by_expert else key

    if (row_select or ROW_SELECT) == "sort":
        sorted_vals, sorted_ids = torch.sort(row_key, dim=1, descending=True)
        top_vals, top_ids = sorted_vals[:, :k], sorted_ids[:, :k]
    else:
        top_vals, top_ids = torch.topk(row_key, k, dim=1)

    # Which slots hold an expert: lifted ones with "drop" (or all when everyone is
    # chosen), all with "topk"; padding rows never.
    if plan.fill == "drop" and not lifted_all:
        occupied = top_vals >= KEY_BOUND
    else:
        occupied = row_valid  # None: every row valid (host n < T handled below)

    if occupied is not None:
        ids = torch.where(occupied, top_ids, -1).to(torch.int32)
    else:
        ids = top_ids.to(torch.int32)
    if router_logits.is_cuda and plan.renormalize and k > 2:
        weights = _cuda_renormalized_weights(scores, top_ids, occupied)
    else:
        weights = torch.nan_to_num(torch.gather(scores, 1, top_ids), nan=0.0)
        if occupied is not None:
            weights = torch.where(occupied, weights, 0.0)
        if plan.renormalize:
            weights = renormalize_rows(weights)
    if n_host is not None and n_host < T:
        weights[n_host:] = 0.0
        ids[n_host:] = -1
    return weights, ids


def _cuda_renormalized_weights(
    scores: torch.Tensor, top_ids: torch.Tensor, occupied: Optional[torch.Tensor]
) -> torch.Tensor:
    """Renormalised slot weights [T, k], computed slot-major ([k, T]) on CUDA.

    Same arithmetic as `renormalize_rows` (the sequential sum is `sequential_row_sum`'s
    cumsum down the slots), one kernel shorter: the gather writes the [k, T] layout the
    cumsum needs, and the division writes straight into a [T, k] result.
    """
    num_tokens, num_slots = top_ids.shape
    weights_t = torch.nan_to_num(torch.gather(scores.t(), 0, top_ids.t()), nan=0.0)  # [k, T]
    if occupied is not None:
        weights_t = torch.where(occupied.t(), weights_t, 0.0)
    total = torch.cumsum(weights_t, dim=0)[num_slots - 1]
    out = torch.empty((num_tokens, num_slots), dtype=torch.float32, device=scores.device)
    torch.div(weights_t, total, out=out.t())
    return out.nan_to_num_(nan=0.0)


def expert_choice_topk_torch(
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
    """Fast PyTorch expert-choice routing; same contract as ``expert_choice_topk``.

    router_logits: [T, E]. Returns (topk_weights [T, k] float32, topk_ids [T, k] int32)
    on the input's device.
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
    return run_torch(router_logits, plan)
