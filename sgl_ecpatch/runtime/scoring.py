"""Numeric building blocks that every routing path shares, so that they agree bit for bit.

* Scores: ``S = softmax(router_logits.float(), dim=-1)`` (or ``sigmoid``), always by the
  same torch op on the whole ``[T, E]`` tensor. Rows are scored independently, padding
  rows included; their scores are simply never used.
* Ranking key: ``S + correction_bias.float()`` (``S`` itself without a bias), one
  elementwise float32 add.
* Total order: NaN below every number (``-inf`` included), ``-0.0 == +0.0``, ties to
  the lower index. `ordered_int32` maps a float32 key to an int32 with exactly that
  order among numbers; `total_order_key` adds the index tie-break and makes every
  ``(t, e)`` key unique within its row and within its column.
* Renormalisation (`renormalize_rows`): a row's weights are summed **sequentially in
  slot order** (``j = 0 .. k-1``) in float32, then each weight is divided by the sum
  when the sum is positive. Every path, the CUDA kernel included, does exactly this,
  because float addition is not associative and the weights must be bitwise equal.
"""

from __future__ import annotations

from typing import Optional

import torch

INT32_MIN = -(2**31)
# Bit pattern of +inf; a magnitude above it is a NaN.
_FLOAT32_INF_BITS = 0x7F800000
_MAGNITUDE_MASK = 0x7FFFFFFF
# total_order_key = ordered * 2**30 + (2**30 - 1 - t - e): the tie-break term stays in
# [0, 2**30) as long as t + e < 2**30, so the key lies in [-2**61, 2**61) (KEY_BOUND).
# The fast path lifts an expert's chosen entries by TIER = 2**62: every lifted key is
# then >= 2**61 > every other key, with no int64 overflow.
TIE_SHIFT = 2**30
KEY_BOUND = 2**61
TIER = 2**62

def routing_scores(router_logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Scores ``S`` [T, E] float32 of ``router_logits`` [T, E] (any float dtype)."""
    if scoring_func == "softmax":
        # softmax(x.float()) in one kernel: the cast happens on load, same bits
        # (tests/runtime pin the equality on the CPU and the GPU).
        return torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    if scoring_func == "sigmoid":
        return torch.sigmoid(router_logits.float())
    raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {scoring_func!r}")


def ranking_key(scores: torch.Tensor, correction_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Ranking key [T, E] float32: ``S + correction_bias`` (the bias only ranks, never weighs)."""
    if correction_bias is None:
        return scores
    return scores + correction_bias.float().reshape(1, -1)


def ordered_int32(key: torch.Tensor) -> torch.Tensor:
    """Map float32 ``key`` to int32 so that integer order is the routing order.

    Numbers: sign-magnitude to two's complement (``-0.0`` and ``+0.0`` both give 0,
    so they tie and the index decides). Every NaN, whatever its sign or payload, maps
    to ``INT32_MIN``, below ``-inf`` (which maps to ``-0x7F800000``).
    """
    bits = key.contiguous().view(torch.int32)
    magnitude = bits & _MAGNITUDE_MASK
    ordered = torch.where(bits < 0, -magnitude, magnitude)
    return torch.where(magnitude > _FLOAT32_INF_BITS, INT32_MIN, ordered)


def nonnegative_ordered_int32(scores: torch.Tensor) -> torch.Tensor:
    """`ordered_int32` for keys that are ``>= +0.0`` or NaN (scores without a bias).

    Softmax and sigmoid never give ``-0.0`` or a negative number, so the raw bits of a
    number are already its order; NaN becomes ``-0.0`` whose bits are ``INT32_MIN``.
    One elementwise op instead of five; same result as `ordered_int32` on such input.
    """
    return torch.nan_to_num(scores, nan=-0.0).view(torch.int32)


def tie_break_table(num_tokens: int, num_experts: int, device) -> torch.Tensor:
    """[T, E] int64 view with ``2**30 - 1 - t - e``: decreasing along rows and columns.

    Built from one arange of length ``T + E - 1`` seen through strides (1, 1), so it
    costs one small kernel whatever T and E are.
    """
    length = max(num_tokens + num_experts - 1, 1)
    line = torch.arange(TIE_SHIFT - 1, TIE_SHIFT - 1 - length, -1, dtype=torch.int64, device=device)
    return line.as_strided((num_tokens, num_experts), (1, 1))


def total_order_key(ordered: torch.Tensor) -> torch.Tensor:
    """Unique int64 key [T, E]: ``ordered * 2**30 + (2**30 - 1 - t - e)``.

    ``ordered`` is `ordered_int32` of the ranking key, [T, E] int32. Within a column
    (fixed e) larger means a larger key or, on a tie, a lower token index; within a
    row (fixed t) a larger key or a lower expert index. So ``torch.topk`` on it is
    exact and deterministic on every device. Values lie in ``[-2**61, 2**61)``; needs
    ``T + E <= 2**30``.
    """
    num_tokens, num_experts = ordered.shape
    ties = tie_break_table(num_tokens, num_experts, ordered.device)
    # int32 times alpha, promoted to int64 inside the add: one kernel.
    return torch.add(ties, ordered, alpha=TIE_SHIFT)


def sequential_row_sum(weights: torch.Tensor) -> torch.Tensor:
    """Row sums [T] of ``weights`` [T, k] float32, added strictly in slot order.

    On CUDA, ``torch.cumsum`` along the outer dimension of a contiguous [k, T] tensor
    runs one thread per column that adds ``acc = acc + x[j]`` for j = 0..k-1 in float32
    (PyTorch's outer-dimension scan), so its last row is the sequential sum in two
    kernels instead of k - 1; ``tests/runtime/test_routing_gpu.py`` pins this
    bit for bit. On the CPU, cumsum accumulates in double, so the sum is a loop of
    float32 adds there.
    """
    num_slots = weights.shape[1]
    if weights.is_cuda and num_slots > 2:
        return torch.cumsum(weights.t().contiguous(), dim=0)[num_slots - 1]
    total = weights[:, 0]
    for slot in range(1, num_slots):
        total = total + weights[:, slot]
    return total


def renormalize_rows(weights: torch.Tensor) -> torch.Tensor:
    """Divide each row of ``weights`` [T, k] float32 (all >= 0) by its sequential sum.

    The sum runs in slot order ``((w0 + w1) + w2) + ...`` in float32 (see
    `sequential_row_sum`). Rows whose sum is 0 (all vacant) stay 0: ``0 / 0`` is NaN
    there and is mapped back to 0. Where the sum is positive no weight exceeds it, so
    no other NaN or inf can appear.
    """
    if weights.shape[1] == 0 or weights.shape[0] == 0:
        return weights
    total = sequential_row_sum(weights)
    return torch.nan_to_num(weights / total.unsqueeze(1), nan=0.0)
