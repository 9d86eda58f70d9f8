"""Hand-checked routing cases, worked out in the comments, on every path."""

from __future__ import annotations

import math

import pytest
import torch

from routing_oracles import assert_same_routing
from sgl_ecpatch.runtime import expert_choice_topk
from sgl_ecpatch.runtime.scoring import nonnegative_ordered_int32, ordered_int32, renormalize_rows

IMPLS = ["reference", "torch"]


def probs_as_logits(rows):
    """Logits whose softmax is (to float32 rounding) the given probability rows."""
    return torch.tensor(rows, dtype=torch.float32).log()


@pytest.mark.parametrize("impl", IMPLS)
def test_two_experts_split_the_tokens(impl):
    # S (softmax):   expert 0  expert 1
    #   t0             0.9       0.1
    #   t1             0.8       0.2
    #   t2             0.7       0.3
    #   t3             0.6       0.4
    # T=4, E=2, k=1, cf=1: C = ceil(4*1*1/2) = 2.
    # Expert 0 takes its 2 best tokens, t0 and t1; expert 1 takes t3 and t2.
    # Token choice would send all four tokens to expert 0; expert choice balances 2/2.
    logits = probs_as_logits([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    weights, ids = expert_choice_topk(logits, 1, capacity_factor=1.0, impl=impl)
    assert ids.tolist() == [[0], [0], [1], [1]]
    # k = 1 and renormalize: w / w == 1 exactly.
    assert weights.tolist() == [[1.0], [1.0], [1.0], [1.0]]

    weights, ids = expert_choice_topk(logits, 1, capacity_factor=1.0, renormalize=False, impl=impl)
    assert torch.allclose(weights, torch.tensor([[0.9], [0.8], [0.3], [0.4]]), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_one_drop_and_topk_fill(impl):
    # S:        e0   e1   e2
    #   t0     0.5  0.3  0.2
    #   t1     0.6  0.1  0.3
    #   t2     0.1  0.2  0.7
    # T=3, E=3, k=2, cf=0.5: C = ceil(3*2*0.5/3) = 1: each expert takes one token.
    #   e0 column (0.5, 0.6, 0.1) -> t1;  e1 (0.3, 0.1, 0.2) -> t0;  e2 (0.2, 0.3, 0.7) -> t2.
    # "drop": each token keeps its one expert, the second slot is vacant (-1, 0).
    # "topk": the second slot takes the token's best other expert:
    #   t0 -> 0 (0.5), t1 -> 2 (0.3), t2 -> 1 (0.2).
    logits = probs_as_logits([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.1, 0.2, 0.7]])
    weights, ids = expert_choice_topk(logits, 2, capacity_factor=0.5, fill="drop", impl=impl)
    assert ids.tolist() == [[1, -1], [0, -1], [2, -1]]
    assert weights.tolist() == [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]

    weights, ids = expert_choice_topk(logits, 2, capacity_factor=0.5, fill="topk", impl=impl)
    assert ids.tolist() == [[1, 0], [0, 2], [2, 1]]
    # Renormalised: t0 (0.3, 0.5) / 0.8, t1 (0.6, 0.3) / 0.9, t2 (0.7, 0.2) / 0.9.
    expected = torch.tensor([[0.375, 0.625], [2 / 3, 1 / 3], [7 / 9, 2 / 9]])
    assert torch.allclose(weights, expected, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ties_go_to_lower_indices(impl):
    # Equal logits: every score is 0.5 and every key ties.
    # T=4, E=2, k=1, cf=1: C = 2. Both experts take the lower token indices t0, t1.
    # t0 and t1 are each chosen by both experts and keep the lower expert index, 0.
    # t2 and t3 are chosen by nobody: vacant with "drop", expert 0 with "topk".
    logits = torch.zeros(4, 2)
    _, ids = expert_choice_topk(logits, 1, capacity_factor=1.0, fill="drop", impl=impl)
    assert ids.tolist() == [[0], [0], [-1], [-1]]
    _, ids = expert_choice_topk(logits, 1, capacity_factor=1.0, fill="topk", impl=impl)
    assert ids.tolist() == [[0], [0], [0], [0]]


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_ranks_below_everything_and_weighs_zero(impl):
    # sigmoid scores: t0 = (nan, 0.5), t1 = (sigmoid(-inf) = 0, sigmoid(1) = 0.7311).
    # T=2, E=2, k=1, cf=1: C = 1.
    #   e0 column (nan, 0.0): NaN ranks below 0.0 -> t1.   e1 column (0.5, 0.731) -> t1.
    # t1 keeps the larger key, e1; t0 is chosen by nobody.
    logits = torch.tensor([[math.nan, 0.0], [-math.inf, 1.0]])
    weights, ids = expert_choice_topk(
        logits, 1, capacity_factor=1.0, scoring_func="sigmoid", renormalize=False, impl=impl
    )
    assert ids.tolist() == [[-1], [1]]
    assert weights[1, 0].item() == torch.sigmoid(torch.tensor(1.0)).item()

    # One row: every expert takes it (C = n = 1), so it keeps both experts in key order:
    # e1 (0.5) first, then e0 whose NaN score weighs 0; renormalised: (1.0, 0.0).
    weights, ids = expert_choice_topk(
        torch.tensor([[math.nan, 0.0]]), 2, scoring_func="sigmoid", impl=impl
    )
    assert ids.tolist() == [[1, 0]]
    assert weights.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_ranks_but_does_not_weigh(impl):
    # Equal logits: S = 1/3 each. The bias (0, 0.1, 0) makes expert 1 the best key;
    # its weight is still S = 1/3, not 1/3 + 0.1.
    logits = torch.zeros(1, 3)
    bias = torch.tensor([0.0, 0.1, 0.0])
    weights, ids = expert_choice_topk(logits, 1, correction_bias=bias, renormalize=False, impl=impl)
    assert ids.tolist() == [[1]]
    assert weights[0, 0].item() == torch.softmax(logits, dim=-1)[0, 1].item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fill", ["drop", "topk"])
def test_padding_rows_never_take_capacity(impl, fill):
    # Rows 2 and 3 are padding (n = 2) and hold the largest logits of the batch.
    # T=4 but n=2, E=2, k=1, cf=1: C(2) = ceil(2*1*1/2) = 1.
    #   e0 over valid rows (0.9, 0.2) -> t0;   e1 (0.1, 0.8) -> t1.
    # Had the padding rows counted, they (score 0.99) would have taken the capacity.
    logits = probs_as_logits([[0.9, 0.1], [0.2, 0.8], [0.99, 0.01], [0.01, 0.99]])
    for n in (2, torch.tensor(2), torch.tensor([2], dtype=torch.int32)):
        weights, ids = expert_choice_topk(
            logits, 1, capacity_factor=1.0, num_token_non_padded=n, fill=fill, impl=impl
        )
        assert ids.tolist() == [[0], [1], [-1], [-1]]
        assert weights.tolist() == [[1.0], [1.0], [0.0], [0.0]]


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_all_padding(impl):
    weights, ids = expert_choice_topk(torch.zeros(0, 8), 2, impl=impl)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)
    weights, ids = expert_choice_topk(torch.randn(3, 8), 2, num_token_non_padded=torch.tensor(0), impl=impl)
    assert (ids == -1).all() and (weights == 0).all()


def test_tiny_capacity_factor_rounds_to_zero():
    # Fraction(0.0004).limit_denominator(1000) == 0, so C == 0: with "drop" nothing is routed.
    from sgl_ecpatch.runtime.config import validate
    from sgl_ecpatch.runtime.fast import run_torch

    logits = torch.randn(5, 4)
    for impl in IMPLS:
        weights, ids = expert_choice_topk(logits, 2, capacity_factor=0.0004, impl=impl)
        assert (ids == -1).all() and (weights == 0).all()
    for fill in ("drop", "topk"):
        for n in (None, 3, torch.tensor(3)):
            kwargs = dict(capacity_factor=0.0004, fill=fill, num_token_non_padded=n)
            expected = expert_choice_topk(logits, 2, impl="reference", **kwargs)
            assert_same_routing(expected, expert_choice_topk(logits, 2, impl="torch", **kwargs))
            for stages in [("sort", "sort"), ("topk", "pairs"), ("auto", "topk")]:
                actual = run_torch(logits, validate(logits, 2, **kwargs), column_stage=stages[0], row_stage=stages[1])
                assert_same_routing(expected, actual, context=f"{fill} n={n} {stages}")


def test_ordered_int32_is_the_routing_order():
    values = [math.nan, -math.nan, -math.inf, -1.0, -1e-45, -0.0, 0.0, 1e-45, 0.5, 1.0, math.inf]
    keys = ordered_int32(torch.tensor(values)).tolist()
    # Both NaNs at the very bottom, equal; -0.0 and +0.0 equal; otherwise strictly increasing.
    assert keys[0] == keys[1] == -(2**31)
    assert keys[5] == keys[6] == 0
    ordered = keys[1:6] + keys[6:]
    assert ordered == sorted(ordered) and len(set(keys[2:])) == len(keys[2:]) - 1

    scores = torch.tensor([math.nan, 0.0, 1e-45, 0.25, 1.0])
    assert torch.equal(nonnegative_ordered_int32(scores), ordered_int32(scores))


def test_renormalize_sums_in_slot_order():
    # (1 + 2**-24) + 2**-24 rounds back to 1 twice in float32 (ties to even), while
    # 2**-24 + 2**-24 + 1 is exact: slot order matters and is the one used.
    w = torch.tensor([[1.0, 2.0**-24, 2.0**-24], [2.0**-24, 2.0**-24, 1.0], [0.0, 0.0, 0.0]])
    out = renormalize_rows(w)
    assert out[0].tolist() == [1.0, 2.0**-24, 2.0**-24]  # divided by exactly 1.0
    total = torch.tensor(1.0 + 2.0**-23, dtype=torch.float32)
    assert torch.equal(out[1], w[1] / total)
    assert out[2].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("fill", ["drop", "topk"])
def test_non_contiguous_logits(fill):
    # A transposed view and a column slice route like their contiguous copies.
    base = torch.randn(12, 40, generator=torch.Generator().manual_seed(5))
    for view in (base.t(), base[:, ::2]):
        assert not view.is_contiguous()
        for impl in IMPLS:
            assert_same_routing(
                expert_choice_topk(view.contiguous(), 3, fill=fill, impl="reference"),
                expert_choice_topk(view, 3, fill=fill, impl=impl),
            )


@pytest.mark.parametrize("num_slots", [1, 2, 3, 8])
def test_slot_major_renormalisation(num_slots):
    """The fast path's renormalisation (slot-major [k, T] sum, division into [T, k])
    gives `renormalize_rows`' bits, all-vacant rows included (0, not NaN).

    On the CPU both add in slot order; the CUDA cumsum's order is pinned on the GPU
    (test_routing_gpu.py).
    """
    from sgl_ecpatch.runtime.fast import _renormalized

    gen = torch.Generator().manual_seed(num_slots)
    mantissa = torch.rand(257, num_slots, generator=gen)
    exponent = torch.randint(-30, 2, (257, num_slots), generator=gen).float()
    weights = mantissa * torch.pow(2.0, exponent)
    weights[3] = 0.0
    weights[7, num_slots // 2 :] = 0.0
    actual = _renormalized(weights.t().contiguous())
    assert actual.shape == weights.shape and actual.is_contiguous()
    assert torch.equal(actual.view(torch.int32), renormalize_rows(weights).view(torch.int32))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("fill", ["drop", "topk"])
def test_fast_path_with_deterministic_algorithms(deterministic, fill):
    """torch.use_deterministic_algorithms(True) takes the plain scatter: same bits."""
    from routing_oracles import make_logits

    logits = make_logits(97, 24, seed=3, mode="quantised")
    expected = expert_choice_topk(logits, 4, fill=fill, num_token_non_padded=90, impl="reference")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        actual = expert_choice_topk(logits, 4, fill=fill, num_token_non_padded=90, impl="torch")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_same_routing(expected, actual)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_softmax_with_dtype_is_softmax_of_float(dtype):
    """routing_scores computes softmax(x, dtype=float32) (one kernel): the contract's
    softmax(x.float()) bit for bit, NaN and infinities included."""
    from sgl_ecpatch.runtime.scoring import routing_scores

    gen = torch.Generator().manual_seed(3)
    for T, E in [(1, 60), (33, 128), (64, 512), (5, 1000), (3, 7)]:
        x = torch.randn(T, E, generator=gen) * 4
        x[0, : E // 3] = float("-inf")
        if T > 2:
            x[1, 0], x[2, 1] = float("nan"), float("inf")
        x = x.to(dtype)
        expected = torch.softmax(x.float(), dim=-1)
        assert torch.equal(routing_scores(x, "softmax").view(torch.int32), expected.view(torch.int32))


def test_device_mask_buffer_is_made_once_per_shape():
    """With n as a tensor the float64 rank/row buffer is host-known: kept after the first
    call (two kernels less per call), and results do not change."""
    from sgl_ecpatch.runtime import fast

    fast._BOUNDS_CACHE.clear()
    logits = torch.randn(40, 16)
    n = torch.tensor(33)
    first = expert_choice_topk(logits, 4, impl="torch", num_token_non_padded=n)
    assert len(fast._BOUNDS_CACHE) == 1
    buffer = next(iter(fast._BOUNDS_CACHE.values()))
    second = expert_choice_topk(logits, 4, impl="torch", num_token_non_padded=n)
    assert len(fast._BOUNDS_CACHE) == 1 and next(iter(fast._BOUNDS_CACHE.values())) is buffer
    assert_same_routing(first, second)
    assert_same_routing(expert_choice_topk(logits, 4, impl="reference", num_token_non_padded=n), second)
    for T in range(1, 80):  # the cache stays bounded
        expert_choice_topk(torch.randn(T, 16), 4, impl="torch", num_token_non_padded=torch.tensor(T))
    assert len(fast._BOUNDS_CACHE) <= fast._BOUNDS_CACHE_SIZE
