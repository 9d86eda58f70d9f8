"""Property tests: the fast path equals the reference, and both keep ROUTING.md's invariants."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing_oracles import DTYPES, assert_same_routing, make_logits, plain_topk_ids
from sgl_ecpatch.runtime import capacity, expert_choice_topk
from sgl_ecpatch.runtime.config import validate
from sgl_ecpatch.runtime import fast
from sgl_ecpatch.runtime.fast import run_torch
from sgl_ecpatch.runtime.scoring import ranking_key, routing_scores

# Keep the Python-loop reference affordable on 2 cores: T * E below this.
MAX_CELLS = 12_000

PROFILE = settings(
    max_examples=int(os.environ.get("ECPATCH_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def routing_inputs(draw):
    num_experts = draw(st.one_of(st.integers(1, 16), st.integers(17, 160), st.sampled_from([60, 128, 512])))
    max_tokens = max(0, min(300, MAX_CELLS // num_experts))
    num_tokens = draw(st.one_of(st.integers(0, min(4, max_tokens)), st.integers(0, max_tokens)))
    top_k = draw(st.one_of(st.integers(1, min(num_experts, 10)), st.integers(1, num_experts)))
    mode = draw(st.sampled_from(["normal", "quantised", "quantised", "constant"]))
    special = draw(st.sampled_from([0.0, 0.0, 0.02, 0.3]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    seed = draw(st.integers(0, 2**31 - 1))
    logits = make_logits(
        num_tokens, num_experts, seed=seed, dtype=DTYPES[dtype], mode=mode, special_fraction=special
    )
    capacity_factor = draw(
        st.one_of(
            # 0.0004 rounds to 0 (C == 0: nothing chosen), a case of its own in every path
            st.sampled_from([0.0004, 0.01, 0.5, 1.0, 1.25, 2.0, 16.0]),
            st.floats(0.01, 16.0, allow_nan=False, allow_infinity=False),
        )
    )
    n_kind = draw(st.sampled_from(["none", "int", "tensor"]))
    if n_kind == "none":
        num_token_non_padded = None
    else:
        n = draw(st.integers(-2, num_tokens + 2))
        num_token_non_padded = n if n_kind == "int" else torch.tensor(n, dtype=draw(
            st.sampled_from([torch.int32, torch.int64])))
    bias_kind = draw(st.sampled_from(["none", "none", "random", "quantised", "special"]))
    if bias_kind == "none":
        bias = None
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        bias = torch.randn(num_experts, generator=gen) * 0.1
        if bias_kind == "quantised":
            bias = torch.randint(-1, 2, (num_experts,), generator=gen).float() * 0.25
        elif bias_kind == "special":
            # NaN, -inf, +inf and -0.0 entries: keys that are NaN or infinite.
            specials = torch.tensor([math.nan, -math.inf, math.inf, -0.0, 0.0])
            bias = specials[torch.randint(0, 5, (num_experts,), generator=gen)]
    kwargs = dict(
        capacity_factor=capacity_factor,
        renormalize=draw(st.booleans()),
        scoring_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        correction_bias=bias,
        num_token_non_padded=num_token_non_padded,
        fill=draw(st.sampled_from(["drop", "topk"])),
    )
    return logits, top_k, kwargs


def _valid_rows(kwargs, num_tokens):
    n = kwargs["num_token_non_padded"]
    if n is None:
        return num_tokens
    return min(max(int(n), 0), num_tokens)


@PROFILE
@given(routing_inputs())
def test_fast_path_equals_reference(case):
    logits, top_k, kwargs = case
    expected = expert_choice_topk(logits, top_k, impl="reference", **kwargs)
    actual = expert_choice_topk(logits, top_k, impl="torch", **kwargs)
    assert_same_routing(expected, actual, context=f"T,E,k={tuple(logits.shape)},{top_k} {kwargs}")
    # The MoE runners read both outputs as plain contiguous [T, k] arrays.
    assert actual[0].is_contiguous() and actual[1].is_contiguous()
    # Both layouts (experts' selection down the [T, E] key's columns or along an
    # [E, T] key's rows) give the same bits; so does the key layout without the flag
    # byte (used past T + E > 2**24), forced here by a tiny flag limit.
    plan = validate(logits, top_k, **kwargs)
    assert_same_routing(expected, run_torch(logits, plan, column_layout="tokens"), context="column_layout=tokens")
    saved = fast._FLAG_MAX_SPAN
    fast._FLAG_MAX_SPAN = 0
    try:
        assert_same_routing(expected, run_torch(logits, plan), context="no flag byte")
    finally:
        fast._FLAG_MAX_SPAN = saved
    assert_same_routing(
        expected, run_torch(logits, plan, column_layout="experts"), context="column_layout=experts"
    )
    # Every stage of the int32 pipeline (no bias; with a bias they fall back to int64).
    for column_stage in ("sort", "topk"):
        for row_stage in ("sort", "pairs"):
            actual = run_torch(logits, plan, column_stage=column_stage, row_stage=row_stage)
            assert_same_routing(expected, actual, context=f"stages {column_stage}/{row_stage}")
            assert actual[0].is_contiguous() and actual[1].is_contiguous()


@PROFILE
@given(routing_inputs(), st.sampled_from(["reference", "torch"]))
def test_invariants(case, impl):
    logits, top_k, kwargs = case
    weights, ids = expert_choice_topk(logits, top_k, impl=impl, **kwargs)
    T, E = logits.shape
    n = _valid_rows(kwargs, T)
    assert weights.shape == (T, top_k) and ids.shape == (T, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32

    # Padding rows: all -1 / 0.
    assert (ids[n:] == -1).all() and (weights[n:] == 0).all()

    valid_ids, valid_w = ids[:n], weights[:n]
    assert ((valid_ids >= -1) & (valid_ids < E)).all()
    assert torch.isfinite(valid_w).all() and (valid_w >= 0).all()
    assert (valid_w[valid_ids == -1] == 0).all()
    for row in valid_ids.tolist():
        present = [e for e in row if e >= 0]
        assert len(present) == len(set(present)), row
        # Vacant slots only at the end of a row.
        assert row[: len(present)] == present, row

    if kwargs["renormalize"]:
        sums = valid_w.double().sum(dim=1)
        nonzero = sums > 0
        assert torch.allclose(sums[nonzero], torch.ones_like(sums[nonzero]), atol=1e-6)

    C = capacity(n, top_k, E, kwargs["capacity_factor"])
    if kwargs["fill"] == "drop":
        load = torch.bincount(valid_ids[valid_ids >= 0].long(), minlength=E)
        assert int(load.max()) <= C
    else:
        # "topk" never leaves a valid row's slot vacant (k <= E).
        assert (valid_ids >= 0).all()


@settings(max_examples=80, deadline=None)
@given(routing_inputs())
def test_drop_is_plain_topk_when_no_expert_is_full(case):
    """With one valid row (or C(n) == n) every expert takes every token: plain top-k."""
    logits, top_k, kwargs = case
    T, E = logits.shape
    n = _valid_rows(kwargs, T)
    if n == 0 or capacity(1, top_k, E, kwargs["capacity_factor"]) == 0:
        return  # C == 0 (cf rounds to 0): every expert is full from the start
    if capacity(n, top_k, E, kwargs["capacity_factor"]) < n:
        # Force the degenerate case: keep only the first valid row.
        kwargs = dict(kwargs, num_token_non_padded=1)
        n = 1
    weights, ids = expert_choice_topk(logits, top_k, impl="torch", **kwargs)
    key = ranking_key(routing_scores(logits, kwargs["scoring_func"]), kwargs["correction_bias"])
    assert ids[:n].tolist() == plain_topk_ids(key[:n], top_k)
    scores = routing_scores(logits, kwargs["scoring_func"])
    expected_w = torch.nan_to_num(torch.gather(scores[:n], 1, ids[:n].long()), nan=0.0)
    if not kwargs["renormalize"]:
        assert torch.equal(weights[:n], expected_w)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(300, 60, 4), (200, 128, 8), (20, 512, 10), (64, 8, 2)])
@pytest.mark.parametrize("fill", ["drop", "topk"])
def test_model_shapes_fast_equals_reference(dtype, shape, fill):
    """The router shapes of real models (Qwen1.5-MoE, Qwen3, Qwen3-Next, Mixtral)."""
    T, E, k = shape
    logits = make_logits(T, E, seed=T * E + k, dtype=DTYPES[dtype], mode="normal")
    for n in (None, torch.tensor(T - 3)):
        expected = expert_choice_topk(logits, k, impl="reference", fill=fill, num_token_non_padded=n)
        actual = expert_choice_topk(logits, k, impl="torch", fill=fill, num_token_non_padded=n)
        assert_same_routing(expected, actual, context=f"{shape} {dtype} {fill} n={n}")
        assert not math.isnan(float(actual[0].sum()))
