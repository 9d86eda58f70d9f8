"""Load accounting on hand-made routing results."""

import pytest
import torch

from sgl_ecpatch.bench.load import (expert_load, gate_mass_retained, load_stats, max_over_mean, rank_load,
                                    rank_slices, token_choice)
from sgl_ecpatch.bench.timemodel import ExpertTimeModel, roofline_us, slowest_rank_us


def test_expert_load_counts_slots_and_ignores_vacant():
    ids = torch.tensor([[0, 1], [0, -1], [3, 0], [-1, -1]], dtype=torch.int32)
    assert expert_load(ids, 4).tolist() == [3, 1, 0, 1]


def test_expert_load_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="num_experts"):
        expert_load(torch.tensor([[4]]), 4)


def test_rank_slices_even_and_uneven():
    assert rank_slices(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # 60 experts over 8 ranks: 4 ranks of 8 and 4 of 7
    sizes = [len(r) for r in rank_slices(60, 8)]
    assert sizes == [8, 8, 8, 8, 7, 7, 7, 7] and sum(sizes) == 60
    with pytest.raises(ValueError):
        rank_slices(4, 8)
    with pytest.raises(ValueError):
        rank_slices(4, 0)


def test_rank_load_and_ratios_by_hand():
    load = torch.tensor([5, 3, 0, 0, 1, 1, 2, 0])
    # 4 ranks of 2 experts: [8, 0, 2, 2] -> mean 3, max 8
    assert rank_load(load, 4).tolist() == [8, 0, 2, 2]
    assert max_over_mean(rank_load(load, 4)) == pytest.approx(8 / 3)
    # 2 ranks: [8, 4] -> 8 / 6
    assert max_over_mean(rank_load(load, 2)) == pytest.approx(8 / 6)
    # one rank: always balanced
    assert max_over_mean(rank_load(load, 1)) == 1.0
    assert max_over_mean(load) == pytest.approx(5 / 1.5)
    assert max_over_mean(torch.zeros(4)) == 1.0


def test_gate_mass_retained_by_hand():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    # top-2 sums: 0.8 and 0.9 -> 1.7
    assert gate_mass_retained(scores, torch.tensor([[0, 1], [1, 2]]), 2) == pytest.approx(1.0)
    # token 0 keeps only expert 2 (0.2), token 1 keeps 1 and 0 (0.7): 0.9 / 1.7
    kept = torch.tensor([[2, -1], [1, 0]])
    assert gate_mass_retained(scores, kept, 2) == pytest.approx(0.9 / 1.7)
    assert gate_mass_retained(scores[:0], kept[:0], 2) == 1.0


def test_load_stats_of_token_choice_on_a_hand_case():
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0], [4.0, 0.0, 3.0, 0.0], [4.0, 0.0, 0.0, 3.0]])
    weights, ids = token_choice(logits, 2)
    assert sorted(ids[:, 0].tolist()) == [0, 0, 0]
    assert torch.allclose(weights.sum(1), torch.ones(3))
    stats = load_stats("token-choice", torch.softmax(logits, 1), ids, 2, ranks=(1, 2, 4))
    # loads [3, 1, 1, 1]: max/mean 3 / 1.5 = 2; two ranks [4, 2] -> 4 / 3
    assert stats.max_expert_load == 3
    assert stats.max_mean_expert == pytest.approx(2.0)
    assert stats.max_mean_rank == {1: 1.0, 2: pytest.approx(4 / 3), 4: pytest.approx(2.0)}
    assert stats.slots_kept == 1.0 and stats.gate_mass == pytest.approx(1.0)
    assert stats.even_split == {1: True, 2: True, 4: True}


def test_time_model_interpolates_scales_and_skips_idle_experts():
    model = ExpertTimeModel(1000, 100, [(1, 10.0), (100, 10.0), (200, 30.0)])
    assert model.us(0) == 0.0
    assert model.us(1) == 10.0 and model.us(50) == 10.0
    assert model.us(150) == pytest.approx(20.0)
    assert model.us(300) == pytest.approx(50.0)  # extrapolates along the last segment
    assert model.us(150, hidden=2000, inter=100) == pytest.approx(40.0)  # twice the hidden*inter


def test_slowest_rank_by_hand():
    model = ExpertTimeModel(1, 1, [(1, 1.0), (10, 10.0)])  # 1 us per token, 1 us minimum
    load = torch.tensor([10, 0, 3, 3])
    # one rank: 10 + 0 + 3 + 3 = 16; two ranks: [10, 6] -> 10; four ranks -> 10
    assert slowest_rank_us(load, 1, model) == pytest.approx(16.0)
    assert slowest_rank_us(load, 2, model) == pytest.approx(10.0)
    balanced = torch.tensor([4, 4, 4, 4])
    assert slowest_rank_us(balanced, 2, model) == pytest.approx(8.0)


def test_roofline_is_memory_bound_then_compute_bound():
    small, large = roofline_us(1, 2048, 768), roofline_us(16384, 2048, 768)
    assert small == roofline_us(8, 2048, 768)  # weights dominate
    assert large == pytest.approx(roofline_us(8192, 2048, 768) * 2)  # FLOPs dominate


def test_agrees_with_the_runtime_load_statistics():
    stats = pytest.importorskip("sgl_ecpatch.runtime.stats")
    from sgl_ecpatch.bench.distributions import router_logits
    from sgl_ecpatch.bench.load import route, scores_of

    logits = router_logits(300, 64, "zipf-0.5", seed=3)
    for method in ("token-choice", "ec-drop", "ec-topk"):
        _, ids = route(method, logits, 8)
        assert expert_load(ids, 64).tolist() == stats.expert_load(ids, 64).tolist()
        mine = rank_load(expert_load(ids, 64), 8)
        assert mine.tolist() == stats.rank_load(stats.expert_load(ids, 64), 8).tolist()
        assert gate_mass_retained(scores_of(logits), ids, 8) == pytest.approx(
            stats.gate_mass_retained(ids, logits, 8), rel=1e-9)


def test_time_model_irons_out_upward_noise():
    # interference only adds time: the 50 at n=8 is noise, the least time at n >= 8 is 20
    model = ExpertTimeModel(1, 1, [(1, 10.0), (8, 50.0), (32, 20.0), (128, 80.0)])
    assert model.points == [(1, 10.0), (8, 20.0), (32, 20.0), (128, 80.0)]
