"""The skewed router distributions produce the skew their docstring states."""

import math

import pytest
import torch

from sgl_ecpatch.bench.distributions import Skew, parse_skew, popularity_ranks, router_logits, token_groups


def _top1_frequencies(logits):
    tokens, experts = logits.shape
    return torch.bincount(logits.argmax(dim=1), minlength=experts).double() / tokens


@pytest.mark.parametrize("s", [0.0, 0.5, 1.0, 1.5])
def test_zipf_top1_frequencies_match_the_stated_law(s):
    tokens, experts = 60_000, 12
    logits = router_logits(tokens, experts, Skew(s=s), seed=5)
    freq = _top1_frequencies(logits)
    ranks = popularity_ranks(experts, 5)  # r_e of each expert
    expected = Skew(s=s).top1_popularity(experts)[ranks - 1]  # P(top-1 = e) = r_e^-s / H(E, s)
    sigma = torch.sqrt(expected * (1 - expected) / tokens)
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-9), (freq, expected)


def test_zipf_max_mean_is_e_over_h():
    # E / H(E, s) by hand for E=4, s=1: H = 1 + 1/2 + 1/3 + 1/4 = 25/12 -> 4 * 12/25 = 1.92
    assert Skew(s=1.0).expected_top1_max_mean(4) == pytest.approx(1.92)
    assert Skew().expected_top1_max_mean(64) == pytest.approx(1.0)


def test_uniform_has_no_popular_expert():
    logits = router_logits(40_000, 8, "uniform", seed=1)
    freq = _top1_frequencies(logits)
    sigma = math.sqrt(1 / 8 * 7 / 8 / 40_000)
    assert (freq - 1 / 8).abs().max() < 5 * sigma


def test_popular_experts_are_spread_not_stacked_on_rank_zero():
    ranks = popularity_ranks(128, 0)
    assert sorted(ranks.tolist()) == list(range(1, 129))
    assert ranks.tolist() != list(range(1, 129))  # not the identity order
    assert torch.equal(ranks, popularity_ranks(128, 0))  # seeded: the same every time


@pytest.mark.parametrize("rho", [0.3, 0.7])
def test_correlated_tokens_share_the_stated_correlation(rho):
    tokens, experts, groups = 4000, 256, 2
    logits = router_logits(tokens, experts, Skew(rho=rho, groups=groups), seed=2).double()
    group = token_groups(tokens, Skew(rho=rho, groups=groups))
    a, b = logits[group == 0], logits[group == 1]
    # one group's tokens vs another token of the same group: correlation over experts ~ rho
    # (the latent offset is one draw per group, so estimate over many experts and token pairs)
    def corr(x, y):
        x = x - x.mean(dim=1, keepdim=True)
        y = y - y.mean(dim=1, keepdim=True)
        return float(((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))).mean())

    same = corr(a[:500], a[500:1000])
    across = corr(a[:500], b[:500])
    assert same == pytest.approx(rho, abs=0.12)
    assert abs(across) < 0.12
    assert same > across + rho / 2


def test_scale_sharpens_scores_but_keeps_the_ranking():
    a = router_logits(64, 32, "zipf-0.5", seed=9)
    b = router_logits(64, 32, "zipf-0.5", seed=9, scale=3.0)
    assert torch.equal(a.argsort(dim=1, stable=True), b.argsort(dim=1, stable=True))
    assert torch.softmax(b, 1).max() > torch.softmax(a, 1).max()


def test_seeded_and_dtype():
    a = router_logits(10, 8, "zipf-1+corr-0.5", seed=4)
    assert torch.equal(a, router_logits(10, 8, "zipf-1+corr-0.5", seed=4))
    assert not torch.equal(a, router_logits(10, 8, "zipf-1+corr-0.5", seed=5))
    assert router_logits(3, 8, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert router_logits(0, 8, "corr-0.5").shape == (0, 8)


@pytest.mark.parametrize("text,expected", [
    ("uniform", Skew()),
    ("zipf-1", Skew(s=1.0)),
    ("zipf:0.25", Skew(s=0.25)),
    ("corr-0.5x4", Skew(rho=0.5, groups=4)),
    ("zipf-0.5+corr-0.3", Skew(s=0.5, rho=0.3)),
])
def test_parse_skew(text, expected):
    assert parse_skew(text) == expected
    assert parse_skew(expected.label) == expected


@pytest.mark.parametrize("text", ["zipf", "gauss-1", "corr-1.5", "zipf--1", "uniform-2", "zipf-1x3", "corr-abc"])
def test_parse_skew_rejects(text):
    with pytest.raises(ValueError, match="skew|rho|Zipf"):
        parse_skew(text)
