"""Load statistics of a routing result, for benchmarks and advice.

Off the hot path: these functions read results back to the host (``.tolist()``,
``float(...)``) and must not be called inside a CUDA graph.

Signatures (all tensors may live on any device):

    expert_load(topk_ids, num_experts, *, num_token_non_padded=None) -> torch.Tensor
        topk_ids: [T, k] integer ids, -1 for a vacant slot or a padding row.
        Returns [E] int64 on the CPU: how many (valid row, slot) pairs name each expert.
        Ids outside [0, E) other than -1 raise ValueError.

    rank_load(load, ep_size) -> torch.Tensor
        load: [E] per-expert load. Experts are split evenly and contiguously over
        `ep_size` expert-parallel ranks (rank r holds experts r*E/G .. (r+1)*E/G - 1,
        as SGLang's EP layout does). Returns [G] int64. E % G != 0 raises ValueError.

    gate_mass_retained(topk_ids, router_logits, top_k, *, scoring_func="softmax",
                       correction_bias=None, num_token_non_padded=None) -> float
        Sum of the scores S[t, e] of the experts the routing gave each valid row,
        over the sum of the scores of plain top-k (token choice on the same ranking
        key, ties to the lower index). 1.0 for plain top-k itself; below 1 the
        routing moved gate mass away from the experts a token wanted. NaN scores
        count as 0; 1.0 when the denominator is 0 (nothing to lose).

    load_stats(topk_ids, num_experts, *, ep_size=1, num_token_non_padded=None,
               router_logits=None, top_k=None, scoring_func="softmax",
               correction_bias=None) -> LoadStats
        Everything above in one frozen record (gate mass only when router_logits
        is given).

`LoadStats` fields: expert_load (tuple of E ints), max_load, mean_load,
max_over_mean (max / mean, 1.0 when nothing is routed), ep_size, rank_load
(tuple of G ints), rank_max_over_mean, assigned (non-vacant slots of valid rows),
vacant (vacant slots of valid rows), valid_rows, gate_mass_retained (float or None).
`as_dict()` gives a JSON-ready dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

from .config import resolve_num_valid_rows_host
from .scoring import ordered_int32, ranking_key, routing_scores, total_order_key

__all__ = [
    "LoadStats",
    "expert_load",
    "rank_load",
    "gate_mass_retained",
    "load_stats",
]


@dataclasses.dataclass(frozen=True)
class LoadStats:
    expert_load: Tuple[int, ...]
    max_load: int
    mean_load: float
    max_over_mean: float
    ep_size: int
    rank_load: Tuple[int, ...]
    rank_max_over_mean: float
    assigned: int
    vacant: int
    valid_rows: int
    gate_mass_retained: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["expert_load"] = list(self.expert_load)
        out["rank_load"] = list(self.rank_load)
        return out


def _max_over_mean(values: torch.Tensor) -> float:
    total = int(values.sum())
    if total == 0:
        return 1.0
    mean = total / values.numel()
    return int(values.max()) / mean


def _valid_ids(topk_ids: torch.Tensor, num_token_non_padded) -> torch.Tensor:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
    n = resolve_num_valid_rows_host(num_token_non_padded, topk_ids.shape[0])
    return topk_ids[:n].detach().to("cpu", torch.int64)


def expert_load(topk_ids: torch.Tensor, num_experts: int, *, num_token_non_padded=None) -> torch.Tensor:
    """Per-expert load [E] (int64, CPU): (valid row, slot) pairs naming each expert."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    ids = _valid_ids(topk_ids, num_token_non_padded).reshape(-1)
    bad = (ids < -1) | (ids >= num_experts)
    if bool(bad.any()):
        raise ValueError(
            f"topk_ids holds ids outside [-1, {num_experts - 1}]: {sorted(set(ids[bad].tolist()))[:5]}"
        )
    ids = ids[ids >= 0]
    return torch.bincount(ids, minlength=num_experts)


def rank_load(load: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Per-rank load [G] when the E experts are split evenly and contiguously over G ranks."""
    num_experts = load.numel()
    if ep_size < 1 or num_experts % ep_size != 0:
        raise ValueError(
            f"ep_size must divide the number of experts ({num_experts}) evenly, got {ep_size}"
        )
    return load.reshape(ep_size, num_experts // ep_size).sum(dim=1)


def gate_mass_retained(
    topk_ids: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    correction_bias: Optional[torch.Tensor] = None,
    num_token_non_padded=None,
) -> float:
    """Kept score mass over plain top-k score mass (see the module docstring)."""
    num_tokens, num_experts = router_logits.shape
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids has {topk_ids.shape[0]} rows but router_logits has {num_tokens}"
        )
    n = resolve_num_valid_rows_host(num_token_non_padded, num_tokens)
    all_scores = routing_scores(router_logits, scoring_func)
    scores = all_scores[:n].detach().cpu()
    key = ranking_key(all_scores, correction_bias)[:n].detach().cpu()
    scores64 = torch.nan_to_num(scores, nan=0.0).double()

    ids = topk_ids[:n].detach().to("cpu", torch.int64)
    present = ids >= 0
    kept = torch.gather(scores64, 1, ids.clamp(min=0)) * present
    kept_mass = float(kept.sum())

    # Plain top-k on the same key with ties to the lower index: sort a total-order
    # integer key that already breaks ties (see scoring.total_order_key).
    order = total_order_key(ordered_int32(key))
    plain = torch.topk(order, min(top_k, num_experts), dim=1).indices
    plain_mass = float(torch.gather(scores64, 1, plain).sum())
    if plain_mass == 0.0:
        return 1.0
    return kept_mass / plain_mass


def load_stats(
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    ep_size: int = 1,
    num_token_non_padded=None,
    router_logits: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
    scoring_func: str = "softmax",
    correction_bias: Optional[torch.Tensor] = None,
) -> LoadStats:
    """All load statistics of one routing result in a `LoadStats` record."""
    load = expert_load(topk_ids, num_experts, num_token_non_padded=num_token_non_padded)
    ranks = rank_load(load, ep_size)
    valid_rows = resolve_num_valid_rows_host(num_token_non_padded, topk_ids.shape[0])
    assigned = int(load.sum())
    vacant = valid_rows * topk_ids.shape[1] - assigned
    gate = None
    if router_logits is not None:
        gate = gate_mass_retained(
            topk_ids,
            router_logits,
            top_k if top_k is not None else topk_ids.shape[1],
            scoring_func=scoring_func,
            correction_bias=correction_bias,
            num_token_non_padded=num_token_non_padded,
        )
    return LoadStats(
        expert_load=tuple(load.tolist()),
        max_load=int(load.max()) if num_experts else 0,
        mean_load=assigned / num_experts,
        max_over_mean=_max_over_mean(load),
        ep_size=ep_size,
        rank_load=tuple(ranks.tolist()),
        rank_max_over_mean=_max_over_mean(ranks),
        assigned=assigned,
        vacant=vacant,
        valid_rows=valid_rows,
        gate_mass_retained=gate,
    )
