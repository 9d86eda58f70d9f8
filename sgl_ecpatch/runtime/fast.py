"""Fast expert-choice routing in PyTorch: vectorised and CUDA-graph safe.

Same results as `reference` (same ids, bitwise-identical weights) with a fixed
number of torch ops whatever T and E are (9 to 14 aten ops with n on the host, 12
to 18 with n on the device below the "pairs" sizes, bf16 logits, see
``benchmarks/count_ops.py``; the seed baseline has 13): no Python loop over tokens or experts (only over the k
slots when renormalising on the CPU, in slot order, see `scoring`), no ``.item()``,
no ``nonzero`` or boolean indexing, and only shapes known on the host, also when
``num_token_non_padded`` is a device tensor. Every choice below is made on the host
from types, shapes and Python values, never from a device value.

How the int64 pipeline works:

1. One int64 key per ``(t, e)``, built by a single add of a tie-break line (one
   ``arange`` of length T + E - 1 seen through strides (1, 1): ``c0 - t - e``) and the
   ranking key's order-preserving int32 ``hi`` shifted left. It orders by the ranking
   key (NaN lowest, -0.0 == +0.0) and then by the lower index, in columns and in rows
   alike, so ``torch.topk`` on it is exact and its ties cannot depend on the device.
   Two encodings (`_Encoding`):

   * no bias (the common case): ``hi`` is the raw bits of the score (scores are
     ``>= +0.0``), NaN -> the bits of ``-inf`` (-2**23), shifted by 2**32, so the high
     32-bit word of a key *is* the score's bits and the weights can be read back from
     the selected keys without a gather;
   * with a correction bias: ``hi`` is `scoring.ordered_int32` of ``S + bias``,
     shifted by 2**30 (`scoring.total_order_key`'s layout); weights are gathered.

   Every key is built *lowered* by a constant D (folded into the line, no extra
   kernel): chosen entries get D back, so they rank above every other entry of
   their row.
2. Expert choice: ``topk(K, C, dim=0)`` picks each expert's tokens and
   ``scatter_(reduce="add")`` adds D at those places (a plain scatter of the values
   plus D under ``torch.use_deterministic_algorithms``, where the atomic add alerts). Padding rows are excluded by
   slicing (n on the host) or by giving them the NaN rank (n on the device: they tie
   with NaN rows and lose on the index, and ``C(n) <= n``). With n on the device the
   capacity ``C(n)`` is data-dependent: the selection takes the static bound ``C(T)``
   sorted and adds D only for ranks ``r < C(n)``, a comparison with n on the device
   (the same ``lt`` kernel as the padding rows' mask).
3. One row-wise ``topk(k)`` lists a token's chosen experts first, in key order, then
   its best other experts: exactly the slot list of ``fill="topk"``; ``fill="drop"``
   makes the unchosen slots vacant: without a bias, byte 3 of a key is a chosen flag
   (1 or 0) read as a bool view, so the ids take one ``where``; with a bias, a key
   is chosen iff it is above a host constant.
4. Weights: the score bits from the keys' high words clamped at 0 (no bias: NaN,
   vacant and padding slots all come out as +0.0), or a gather of the scores with
   NaN -> 0 and vacant -> 0; then renormalised by the shared sequential sum, computed
   slot-major ([k, T]: one ``cumsum`` on CUDA) and divided straight into the [T, k]
   result.

Two pipelines (`_stages`, decided on the host from the plan and shapes):

* **int32** (no correction bias, the common case; `_run_int32`): the key is the score's
  32-bit pattern and every tie is settled by *stable* sorts instead of tie bits.
  Column stage: a stable descending ``torch.sort`` of the [E, T] keys (one kernel for
  T <= 4096; each column's max when C == 1) or ``torch.topk`` on unique int64 keys
  (above `SORT_MAX_TOKENS`, and within `COLUMN_TOPK_TOKENS`, where it measured faster). Row
  stage: the chosen entries get a flag (2**30 + 1) and each row is sorted stably, or,
  from `PAIRS_MIN_ELEMENTS` = T * E with ``fill="drop"``, only the E * C chosen
  (token, score, expert) triples are sorted, packed one int64 each. 32-bit sorts and
  top-k run half the radix passes of 64-bit ones (`benchmarks/torch_primitives.py`).
* **int64** (below; with a bias, and where measured faster: nothing to select with
  many experts, or T above `SORT_MAX_TOKENS` with few experts): unique int64 keys and
  two ``torch.topk``.

The `COLUMN_STAGE` / `ROW_STAGE` knobs ("auto", or "sort"/"topk" and
"sort"/"pairs"/"topk") force a stage for benchmarks and tests; all give the same bits.

Shortcuts decided on the host: when no expert can be full (``C(m) == m`` for every
possible n, e.g. a single row) step 2 is skipped and the result is plain top-k; with
n on the host and ``fill="drop"`` the padding rows come out vacant by themselves.

``COLUMN_LAYOUT`` ("auto", "tokens" or "experts") picks where the experts' selection
runs: down the columns of the [T, E] key, or along the rows of an [E, T] key
(contiguous reads, one more kernel: the transpose copy for the row stage); same bits.
On the H200 the [E, T] layout was faster from T = 1024 on (and about even below), so
"auto" takes it for ``T >= EXPERTS_LAYOUT_MIN_TOKENS`` (decided on the host from T);
``benchmarks/routing_torch.py`` times both.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Optional, Tuple

import torch

from .config import RoutingPlan, validate
from .scoring import INT32_MIN, KEY_BOUND, TIE_SHIFT, TIER, ordered_int32, ranking_key, routing_scores

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


COLUMN_LAYOUT = "auto"
EXPERTS_LAYOUT_MIN_TOKENS = 1024


class _Encoding:
    """How a key is laid out (see the module docstring, step 1).

    key = hi * shift + flag + (c0 - t - e) - lowered, with ``hi`` an int32 [T, E] and
    the tie term ``c0 - t - e`` in [0, flag or 2**tie_bits). Chosen entries get
    ``lowered`` back. With a ``flag`` (2**24), byte 3 of a key is exactly 1 where the
    entry is chosen and 0 where it is not: a bool *view* of the selected keys is the
    chosen mask, no compare kernel. Without one, a selected key is chosen iff it is
    ``>= chosen_min``.
    """

    def __init__(self, *, shift, tie_bits, flag, lowered, pad_hi, chosen_min, score_bits):
        self.shift, self.c0, self.flag = shift, 2**tie_bits - 1, flag
        self.lowered = lowered + flag  # clears the flag of every unchosen key
        self.pad_hi, self.chosen_min, self.score_bits = pad_hi, chosen_min, score_bits


_FLAG_BITS = 24  # the flag is bit 24: byte 3 of the little-endian int64
_FLAG_MAX_SPAN = 2**_FLAG_BITS  # the tie term c0 - t - e must fit below it: T + E <= 2**24
_LITTLE_ENDIAN = sys.byteorder == "little"


def _encoding(biased: bool, num_tokens: int, num_experts: int) -> _Encoding:
    """The key layout for this call (decided on the host from the plan and shapes).

    No bias (``score_bits``): hi = the score's bits, in [0, 0x3F800000] (scores are in
    [+0.0, 1]) or -2**23 for NaN (the bits of -inf), shifted by 2**32, so the high word
    of a key is hi. Keys lie in [-2**55, 2**62 - 2**55 + 2**32); lowered by 3 * 2**61
    they are below -2**61 (< -2**55) and above -2**63. The high word of a chosen key
    is hi, of an unchosen one hi - 3 * 2**29 < 0.

    With a bias: hi = `scoring.ordered_int32` of S + bias (any int32), shifted by 2**30
    (keys in [-2**61, 2**61), `scoring.total_order_key`'s layout), lowered by 2**62;
    no flag.
    """
    if not biased:
        # Byte 3 (bits 24..31) lies in the low word: flag and tie term only.
        flagged = _LITTLE_ENDIAN and num_tokens + num_experts <= _FLAG_MAX_SPAN
        return _Encoding(shift=2**32, tie_bits=_FLAG_BITS if flagged else 30, flag=2**_FLAG_BITS if flagged else 0,
                         lowered=3 * 2**61, pad_hi=-(2**23), chosen_min=-(2**55), score_bits=True)
    # hi takes all 32 bits here, so no byte of the key is free for a flag.
    return _Encoding(shift=TIE_SHIFT, tie_bits=30, flag=0, lowered=TIER,
                     pad_hi=INT32_MIN, chosen_min=-KEY_BOUND, score_bits=False)


_NAN_BITS = float("-inf")  # no bias: NaN scores rank as the bits of -inf (-2**23)


def _key(hi: torch.Tensor, enc: _Encoding, lowered: int, by_expert: bool) -> torch.Tensor:
    """int64 key, [T, E] (or [E, T] contiguous when by_expert): one arange and one add."""
    num_tokens, num_experts = hi.shape
    length = max(num_tokens + num_experts - 1, 1)
    top = enc.c0 + enc.flag - lowered
    line = torch.arange(top, top - length, -1, dtype=torch.int64, device=hi.device)
    if by_expert:
        ties, hi = line.as_strided((num_experts, num_tokens), (1, 1)), hi.t()
        out = torch.empty((num_experts, num_tokens), dtype=torch.int64, device=hi.device)
        return torch.add(ties, hi, alpha=enc.shift, out=out)
    # int32 times alpha, promoted to int64 inside the add: one kernel.
    return torch.add(line.as_strided((num_tokens, num_experts), (1, 1)), hi, alpha=enc.shift)


def _flags(values: torch.Tensor) -> torch.Tensor:
    """Byte 3 of each int64 of ``values`` [T, k] as a bool view: the chosen flag."""
    num_tokens, num_slots = values.shape
    return values.view(torch.bool).view(num_tokens, num_slots, 8).select(2, 3)


def _words(values: torch.Tensor, word: int) -> torch.Tensor:
    """The low (0) or high (1) int32 word of each int64 of ``values`` [T, k], as a view."""
    num_tokens, num_slots = values.shape
    return values.view(torch.int32).view(num_tokens, num_slots, 2).select(2, word)


def _slot_sum(weights_t: torch.Tensor) -> torch.Tensor:
    """Sum over the slots of ``weights_t`` [k, T], strictly in slot order (`scoring`)."""
    num_slots = weights_t.shape[0]
    if weights_t.is_cuda and num_slots > 2:
        # CUDA's outer-dimension scan adds acc = acc + x[j] in float32, slot by slot
        # (scoring.sequential_row_sum; pinned by tests/runtime/test_routing_gpu.py).
        return torch.cumsum(weights_t, dim=0).select(0, num_slots - 1)
    total = weights_t.select(0, 0)
    for slot in range(1, num_slots):
        total = total + weights_t.select(0, slot)
    return total


def _renormalized(weights_t: torch.Tensor) -> torch.Tensor:
    """[T, k] weights divided by their sequential row sum, from slot-major ``weights_t``."""
    num_slots, num_tokens = weights_t.shape
    out = torch.empty((num_tokens, num_slots), dtype=torch.float32, device=weights_t.device)
    torch.div(weights_t, _slot_sum(weights_t), out=out.t())
    # 0 / 0 = NaN where the row is all vacant: back to 0. Where the sum is positive no
    # weight exceeds it, so no other NaN or inf can appear.
    return out.nan_to_num_(nan=0.0)


@torch.no_grad()
def run_torch(
    router_logits: torch.Tensor,
    plan: RoutingPlan,
    *,
    column_layout: Optional[str] = None,
    column_stage: Optional[str] = None,
    row_stage: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Route with validated arguments (see `expert_choice_topk_torch`).

    ``column_stage`` / ``row_stage`` (default `COLUMN_STAGE` / `ROW_STAGE`) pick how
    the experts' and the tokens' selections run (see "Stages" in the module docstring);
    every choice gives the same bits.

    ``column_layout`` ("auto", "tokens" or "experts", default `COLUMN_LAYOUT`): the
    experts' selection runs down the columns of the [T, E] key, or along the rows of an
    [E, T] key; same bits ("auto": [E, T] from `EXPERTS_LAYOUT_MIN_TOKENS` tokens on).

    Runs under ``no_grad``: like the reference, the weights carry no autograd history.
    """
    T, E, k = plan.num_tokens, plan.num_experts, plan.top_k
    device = router_logits.device
    n_host = plan.num_valid
    if T == 0 or n_host == 0:
        return _empty_result(plan, device)

    scores = routing_scores(router_logits, plan.scoring_func)
    everyone = _everyone_chosen(plan)
    max_capacity = plan.max_capacity if n_host is None else plan.host_capacity
    selecting = not everyone and max_capacity > 0
    stages = _stages(plan, selecting, column_stage or COLUMN_STAGE, row_stage or ROW_STAGE)
    if stages is not None:
        return _run_int32(scores, plan, stages, everyone=everyone, selecting=selecting, capacity=max_capacity)

    enc = _encoding(plan.correction_bias is not None, T, E)
    if enc.score_bits:
        # Softmax and sigmoid give +0.0 .. 1 or NaN (never -0.0): the bits are the order.
        hi = torch.nan_to_num(scores, nan=_NAN_BITS).view(torch.int32)
    else:
        hi = ordered_int32(ranking_key(scores, plan.correction_bias))

    # Rows that are valid, as a [T, 1] device mask, and the capacity test of the sorted
    # ranks, only when n lives on the device (one compare for both, see `_device_masks`).
    # n is compared, never multiplied, so it needs no clamp and no cast (an int32 n
    # cannot overflow): t < n and the rank test hold for clamp(n, 0, T) alike.
    row_valid, rank_kept = _padding_masks(plan, max_capacity if selecting else 0, device)
    if n_host is None:
        # Padding rows take the NaN rank: below every valid row with a number, and
        # tied with NaN rows, which win on the lower index. As C(n) <= n, no padding
        # row is ever among an expert's first C(n) tokens.
        hi = torch.where(row_valid, hi, enc.pad_hi)

    if everyone:
        # No selection to make: every expert takes every valid token (kept = plain
        # top-k). Keys are not lowered, so every slot of a valid row is chosen.
        row_key = _key(hi, enc, 0, by_expert=False)
    elif max_capacity == 0:
        # C == 0 (only possible for cf < 1/2000): nothing is chosen, keys stay lowered.
        row_key = _key(hi, enc, enc.lowered, by_expert=False)
    else:
        layout = column_layout or COLUMN_LAYOUT
        if layout == "auto":
            layout = "experts" if T >= EXPERTS_LAYOUT_MIN_TOKENS else "tokens"
        if layout not in ("tokens", "experts"):
            raise ValueError(f"column_layout must be 'auto', 'tokens' or 'experts', got {layout!r}")
        by_expert = layout == "experts"
        key = _key(hi, enc, enc.lowered, by_expert)
        token_dim = 1 if by_expert else 0
        if n_host is not None:
            column_key = key if n_host == T else key.narrow(token_dim, 0, n_host)
            vals, token_idx = torch.topk(column_key, max_capacity, dim=token_dim, sorted=False)
            if torch.are_deterministic_algorithms_enabled():
                # scatter with a reduction alerts there (CUDA atomics): add, then write.
                key.scatter_(token_dim, token_idx, vals + enc.lowered)
            else:
                # Indices are distinct within a column, so the atomic add of D at each
                # is exact and deterministic: one kernel instead of two.
                key.scatter_(token_dim, token_idx, enc.lowered, reduce="add")
        else:
            vals, token_idx = torch.topk(key, max_capacity, dim=token_dim, sorted=True)
            lifted = torch.add(vals, rank_kept.unsqueeze(1 - token_dim), alpha=enc.lowered)
            key.scatter_(token_dim, token_idx, lifted)
        row_key = key.t().contiguous() if by_expert else key

    top_vals, top_ids = torch.topk(row_key, k, dim=1)

    # Which slots hold an expert: chosen ones with "drop" (all when everyone is chosen),
    # all with "topk"; padding rows never. None: every slot.
    chosen_only = plan.fill == "drop" and not everyone
    if not chosen_only:
        occupied = row_valid
    elif enc.flag:
        occupied = _flags(top_vals)
    else:
        occupied = top_vals >= enc.chosen_min

    low_ids = _words(top_ids, 0) if _LITTLE_ENDIAN else top_ids.to(torch.int32)
    ids = torch.where(occupied, low_ids, -1) if occupied is not None else low_ids.contiguous()

    slot_major = plan.renormalize
    if enc.score_bits and (plan.fill == "drop" or everyone):
        # The high word of a selected key is the score's bits where the slot is
        # chosen, negative where it is not (vacant), -2**23 for NaN and padding: the
        # weight is that word clamped at 0, one kernel and no gather.
        high = _words(top_vals, 1)
        if slot_major:
            bits = torch.empty((k, T), dtype=torch.int32, device=device)
            torch.clamp(high.t(), min=0, out=bits)
        else:
            bits = torch.clamp(high, min=0)
        weights = bits.view(torch.float32)
    else:
        weights = _gathered_weights(scores, top_ids, occupied, slot_major)
    return _finished(weights, ids, plan, padding_vacant=chosen_only)


def _gathered_weights(scores: torch.Tensor, top_ids: torch.Tensor, occupied: Optional[torch.Tensor],
                      slot_major: bool) -> torch.Tensor:
    """The scores of the selected experts ([k, T] when ``slot_major``, else [T, k]),
    NaN -> 0, and 0 where a slot is not occupied."""
    if slot_major:
        weights = torch.gather(scores.t(), 0, top_ids.t())  # [k, T], contiguous
    else:
        weights = torch.gather(scores, 1, top_ids)
    weights.nan_to_num_(nan=0.0)
    if occupied is not None:
        # Weights are finite and >= +0.0 here: times 1 is exact, times 0 is +0.0.
        weights.mul_(occupied.t() if slot_major else occupied)
    return weights


def _finished(weights: torch.Tensor, ids: torch.Tensor, plan: RoutingPlan,
              padding_vacant: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Renormalise slot-major weights (when asked) and clear the padding rows of n on the
    host, unless they are vacant already (never chosen with "drop")."""
    if plan.renormalize:
        weights = _renormalized(weights)
    n_host, T = plan.num_valid, plan.num_tokens
    if n_host is not None and n_host < T and not padding_vacant:
        weights.narrow(0, n_host, T - n_host).fill_(0.0)
        ids.narrow(0, n_host, T - n_host).fill_(-1)
    return weights, ids


# --- The int32 pipeline (no correction bias) --------------------------------------

COLUMN_STAGE = "auto"
ROW_STAGE = "auto"
SORT_MAX_TOKENS = 4096  # torch sorts slices up to 4096 long in one kernel
PAIRS_MIN_ELEMENTS = 2**23  # T * E from which "pairs" beats the row sort (H200)
COLUMN_TOPK_TOKENS = (128, 512)  # T range where the column stage takes the int64 top-k (H200)
INT32_ROW_SORT_MAX_EXPERTS = 128  # no selection (e.g. T = 1): above this, the int64 row top-k

# int32 keys: the score's bits (+0.0 .. 1.0 -> 0 .. 0x3F800000); NaN -> the bits of
# -inf (-2**23), also for padding rows (n on the device), which then tie with NaN rows
# and lose on the index. A chosen entry gets the flag 2**30 + 1 added: chosen numbers
# >= 2**30 + 1 > chosen NaN (0x3F800001) > unchosen numbers (<= 0x3F800000) > NaN.
_FLAG32 = 2**30 + 1
_NAN32 = -(2**23)
_CHOSEN_MIN32 = _FLAG32 + _NAN32  # the smallest key of a chosen entry
_ONE_BITS = 0x3F800000  # bits of 1.0, the largest score
_PAIR_TOKEN_SHIFT, _PAIR_KEY_SHIFT = 41, 10  # pair = t << 41 | (1.0 bits - hi) << 10 | e
_COLUMN64 = _Encoding(shift=2**32, tie_bits=30, flag=0, lowered=0, pad_hi=_NAN32, chosen_min=0, score_bits=True)


def _stages(plan: RoutingPlan, selecting: bool, column_stage: str, row_stage: str) -> Optional[Tuple[str, str]]:
    """(column stage, row stage) of the int32 pipeline, or None for the int64 one.

    Decided on the host from the plan and shapes. The int32 pipeline needs scores as
    the ranking key (no correction bias: with one the key takes all 32 bits and leaves
    no room for the chosen flag).
    """
    for name, value, allowed in (("column_stage", column_stage, ("auto", "sort", "topk")),
                                 ("row_stage", row_stage, ("auto", "sort", "pairs", "topk"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if plan.correction_bias is not None or row_stage == "topk":
        return None
    T, E = plan.num_tokens, plan.num_experts
    auto = row_stage == "auto" and column_stage == "auto"
    if column_stage == "auto":
        # int64 top-k beat the stable sort at T = 256 on the H200 (by 4-6 µs) and lost at
        # T = 16 and 1024; between, the crossover is not measured
        sorted_ok = T <= SORT_MAX_TOKENS and not COLUMN_TOPK_TOKENS[0] <= T <= COLUMN_TOPK_TOKENS[1]
        column_stage = "sort" if sorted_ok else "topk"
    if auto and (not selecting and E > INT32_ROW_SORT_MAX_EXPERTS or T > SORT_MAX_TOKENS and E < 128):
        # Measured on the H200: a row top-k of k beats a full row sort of many experts
        # when nothing is selected; few experts at large T are faster in int64 too.
        return None
    pairs_ok = selecting and plan.fill == "drop" and T < 2 ** (63 - _PAIR_TOKEN_SHIFT) - 1 and E <= 2**_PAIR_KEY_SHIFT
    if row_stage == "auto":
        row_stage = "pairs" if pairs_ok and T * E >= PAIRS_MIN_ELEMENTS else "sort"
    elif row_stage == "pairs" and not pairs_ok:
        row_stage = "sort"  # nothing to pair up (or "topk" fill): the row sort does it all
    return column_stage, row_stage


def _run_int32(scores: torch.Tensor, plan: RoutingPlan, stages: Tuple[str, str], *, everyone: bool,
               selecting: bool, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Route on int32 keys: one stable sort (or unique int64 top-k) per stage.

    ``hi`` [T, E] int32 is the score's bits (scores are +0.0 .. 1, never -0.0, so the
    bits are the order), the bits of -inf (-2**23) for NaN and, when n is on the device,
    for padding rows (they tie with NaN rows and lose on the index).
    Column stage: each expert's first ``capacity`` tokens in (hi desc, t asc) order,
    from a stable descending sort of the [E, T] copy (ties keep the lower token first)
    or from `torch.topk` on the unique int64 key ``hi * 2**32 + tie term``. Row stage:
    "sort" adds 2**30 + 1 to the chosen entries of ``hi`` and sorts each row stably
    (chosen first, then by score, ties to the lower expert); "pairs" sorts only the
    E * capacity chosen (token, score, expert) triples packed in one int64 each.
    """
    T, k = plan.num_tokens, plan.top_k
    device = scores.device
    n_host = plan.num_valid
    column_stage, row_stage = stages
    if not selecting and not everyone and plan.fill == "drop":
        return _empty_result(plan, device)  # C == 0: no expert keeps any token
    hi = torch.nan_to_num(scores, nan=_NAN_BITS).view(torch.int32)  # NaN -> bits of -inf

    row_valid, rank_kept = _padding_masks(plan, capacity if selecting else 0, device)
    if row_valid is not None:
        hi = torch.where(row_valid, hi, _NAN32)

    token_idx: Optional[torch.Tensor] = None  # [E, capacity]: each expert's tokens, best first
    if selecting:
        rows = hi if n_host is None or n_host == T else hi.narrow(0, 0, n_host)
        if column_stage == "sort" and capacity == 1:
            # Each expert takes one token (decode sizes with many experts): the column's
            # max, whose index is the first (lowest) among equal keys: one reduction
            # instead of a transposed copy and a sort.
            token_idx = rows.max(dim=0).indices.unsqueeze(1)
        elif column_stage == "sort":
            order = torch.sort(rows.t().contiguous(), dim=1, descending=True, stable=True).indices
            token_idx = order.narrow(1, 0, capacity)
        else:
            key = _key(rows, _COLUMN64, 0, by_expert=True)
            token_idx = torch.topk(key, capacity, dim=1, sorted=rank_kept is not None).indices

    if row_stage == "pairs":
        weight_bits, ids = _pairs_stage(hi, token_idx, rank_kept, plan)
        weights = weight_bits.view(torch.float32)
        if plan.renormalize:
            weights = _renormalized(weights.t())
        return weights, ids

    flagged = selecting  # chosen entries carry the flag 2**30 + 1
    if selecting:
        columns = hi.t()  # [E, T] view of the row keys
        add = _FLAG32
        if rank_kept is not None:  # the flag for ranks below C(n): int32 in one kernel
            add = torch.mul(rank_kept, _FLAG32, out=torch.empty(rank_kept.shape, dtype=torch.int32, device=device))
            add = add.expand(token_idx.shape)
        # Tokens are distinct within a column, so adding is exact and order-free; under
        # torch.use_deterministic_algorithms (where scatter_add alerts) add, then write.
        if torch.are_deterministic_algorithms_enabled():
            columns.scatter_(1, token_idx, columns.gather(1, token_idx) + add)
        elif rank_kept is None:
            columns.scatter_(1, token_idx, _FLAG32, reduce="add")
        else:
            columns.scatter_add_(1, token_idx, add)
    vals, order = torch.sort(hi, dim=1, descending=True, stable=True)
    top_vals, top_ids = vals.narrow(1, 0, k), order.narrow(1, 0, k)

    chosen_only = plan.fill == "drop" and not everyone
    occupied = (top_vals >= _CHOSEN_MIN32) if chosen_only else row_valid
    low_ids = _words(top_ids, 0) if _LITTLE_ENDIAN else top_ids.to(torch.int32)
    ids = torch.where(occupied, low_ids, -1) if occupied is not None else low_ids.contiguous()

    slot_major = plan.renormalize
    if plan.fill == "drop" or everyone:
        # The sorted key minus the flag is the score's bits where the slot is chosen (or
        # everyone is), negative where it is vacant, NaN or padding: clamped at 0.
        bits = torch.empty((k, T) if slot_major else (T, k), dtype=torch.int32, device=device)
        src = top_vals.t() if slot_major else top_vals
        if flagged:
            torch.sub(src, _FLAG32, out=bits).clamp_(min=0)
        else:
            torch.clamp(src, min=0, out=bits)
        weights = bits.view(torch.float32)
    else:
        weights = _gathered_weights(scores, top_ids, occupied, slot_major)
    return _finished(weights, ids, plan, padding_vacant=chosen_only)


def _pairs_stage(hi: torch.Tensor, token_idx: torch.Tensor, rank_kept: Optional[torch.Tensor],
                 plan: RoutingPlan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row stage of "drop" from the E * C chosen pairs only: ([T, k] weight bits, ids).

    Each pair (t, e) packs into one int64 ``t << 41 | (bits of 1.0 - hi) << 10 | e``, so
    one ascending sort groups the pairs by token, best score first, ties to the lower
    expert: a pair's slot is its position minus its token's first position
    (`torch.searchsorted` on the sorted tokens). Slots past k, and pairs ranked past
    C(n) (n on the device, packed as the largest int64), go to a dump element.
    """
    T, E, k = plan.num_tokens, plan.num_experts, plan.top_k
    device = hi.device
    experts = torch.arange(E, dtype=torch.int64, device=device).unsqueeze(1)
    packed = torch.add(experts + (_ONE_BITS << _PAIR_KEY_SHIFT), token_idx, alpha=1 << _PAIR_TOKEN_SHIFT)
    packed.sub_(hi.t().gather(1, token_idx), alpha=1 << _PAIR_KEY_SHIFT)
    if rank_kept is not None:
        packed = torch.where(rank_kept, packed, torch.iinfo(torch.int64).max)
    packed = torch.sort(packed.view(-1)).values
    tokens = packed >> _PAIR_TOKEN_SHIFT
    slot = torch.arange(packed.numel(), device=device) - torch.searchsorted(tokens, tokens)
    dump = T * k
    dest = torch.add(slot, tokens, alpha=k).clamp_(max=dump)
    dest = torch.where(slot < k, dest, dump)
    # bits of the score = bits of 1.0 - the packed middle field; NaN (hi = -2**23) -> 0
    bits = torch.clamp(_ONE_BITS - ((packed >> _PAIR_KEY_SHIFT) & (2**31 - 1)), min=0).to(torch.int32)
    ids = torch.full((dump + 1,), -1, dtype=torch.int32, device=device)
    ids.scatter_(0, dest, (packed & (2**_PAIR_KEY_SHIFT - 1)).to(torch.int32))
    weight_bits = torch.zeros(dump + 1, dtype=torch.int32, device=device)
    weight_bits.scatter_(0, dest, bits)
    return weight_bits.narrow(0, 0, dump).view(T, k), ids.narrow(0, 0, dump).view(T, k)


def _padding_masks(plan: RoutingPlan, num_ranks: int, device
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """`_device_masks` when n lives on the device, else (None, None)."""
    if plan.num_valid is not None:
        return None, None
    n_dev = plan.num_valid_tensor
    if n_dev.device != device:
        n_dev = n_dev.to(device)
    return _device_masks(plan, num_ranks, n_dev, device)


def _device_masks(
    plan: RoutingPlan, num_ranks: int, n_dev: torch.Tensor, device
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Row mask ``t < n`` [T, 1] and rank mask [num_ranks] (None when 0), one compare.

    Sorted rank r of an expert's column is within the capacity iff r < C(n), and here
    C(n) = ceil(n * kp / eq) with kp < eq (else everyone is chosen), so
    r < ceil(n*kp/eq)  <=>  r*eq < n*kp  <=>  (r*eq + 1/2) / kp < n  (integers).
    Both left sides sit in one float64 buffer (``t`` exactly; ``(r*eq + 1/2) / kp``
    from an ``arange``, whose error of a few ulps of values up to about T is far below
    the 1/(2 kp) margin to any integer: the host checks the bound) and one ``lt`` with
    n answers both. Past the bound, an exact integer form costs two more kernels.
    """
    T = plan.num_tokens
    if num_ranks == 0:
        return torch.arange(T, device=device).unsqueeze(1) < n_dev, None
    kp = plan.top_k * plan.cf.numerator
    eq = plan.num_experts * plan.cf.denominator
    step, start = eq / kp, 0.5 / kp
    end = start + (num_ranks - 0.5) * step
    if num_ranks * eq + kp < 2**44 and math.ceil((end - start) / step) == num_ranks:
        kept = _bounds(T, num_ranks, start, end, step, device) < n_dev
        return kept.narrow(0, 0, T).unsqueeze(1), kept.narrow(0, T, num_ranks)
    if num_ranks * eq >= 2**62:
        raise ValueError(f"router_logits is too large for exact capacity arithmetic: T = {T}")
    rank_floor = torch.arange(0, num_ranks * eq, eq, dtype=torch.int64, device=device) // kp
    return torch.arange(T, device=device).unsqueeze(1) < n_dev, rank_floor < n_dev


_BOUNDS_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_BOUNDS_CACHE_SIZE = 64


def _bounds(T: int, num_ranks: int, start: float, end: float, step: float, device) -> torch.Tensor:
    """The float64 buffer [0, 1, .., T-1, start, start + step, ..] of `_device_masks`.

    It depends on host values only, so it is made once per shape and device and kept
    (at most `_BOUNDS_CACHE_SIZE`, oldest out): two kernels less per call. Never kept
    when made during a CUDA-graph capture (its kernels would only run at replay);
    SGLang's graph runner calls the layer eagerly before it captures. When it is kept,
    the stream that filled it is synchronised once, so any stream may read it later:
    one host sync per shape, on an eager first call, never on the hot path.
    """
    device = torch.device(device)
    capturing = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    key = (device, T, num_ranks, start, step)
    bounds = _BOUNDS_CACHE.get(key)
    if bounds is not None:
        _BOUNDS_CACHE.move_to_end(key)
        return bounds
    bounds = torch.empty(T + num_ranks, dtype=torch.float64, device=device)
    torch.arange(T, out=bounds.narrow(0, 0, T))
    torch.arange(start, end, step, out=bounds.narrow(0, T, num_ranks))
    if not capturing and type(bounds) is torch.Tensor:  # not a fake or traced tensor
        if bounds.is_cuda:
            torch.cuda.current_stream(bounds.device).synchronize()
        _BOUNDS_CACHE[key] = bounds
        while len(_BOUNDS_CACHE) > _BOUNDS_CACHE_SIZE:
            _BOUNDS_CACHE.popitem(last=False)
    return bounds


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
