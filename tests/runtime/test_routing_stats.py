"""Load statistics on hand-made routing results."""

from __future__ import annotations

import pytest
import torch

from sgl_ecpatch.runtime import expert_choice_topk
from sgl_ecpatch.runtime.stats import expert_load, gate_mass_retained, load_stats, rank_load

IDS = torch.tensor([[0, 1], [0, 2], [0, -1], [3, -1]], dtype=torch.int32)


def test_load_stats_by_hand():
    # Expert 0 appears 3 times, experts 1, 2, 3 once: load (3, 1, 1, 1), 6 assigned,
    # 2 vacant. Mean 6/4 = 1.5, max/mean = 3 / 1.5 = 2.
    # Two EP ranks hold experts {0, 1} and {2, 3}: rank loads (4, 2), mean 3, max/mean 4/3.
    stats = load_stats(IDS, 4, ep_size=2)
    assert stats.expert_load == (3, 1, 1, 1)
    assert stats.max_load == 3 and stats.mean_load == 1.5 and stats.max_over_mean == 2.0
    assert stats.rank_load == (4, 2) and stats.rank_max_over_mean == pytest.approx(4 / 3)
    assert (stats.assigned, stats.vacant, stats.valid_rows) == (6, 2, 4)
    assert stats.gate_mass_retained is None
    assert stats.as_dict()["expert_load"] == [3, 1, 1, 1]


def test_padding_rows_do_not_count():
    # n = 3 drops row 3 (expert 3): load (3, 1, 1, 0); 3 rows * 2 slots - 5 = 1 vacant.
    stats = load_stats(IDS, 4, num_token_non_padded=torch.tensor(3))
    assert stats.expert_load == (3, 1, 1, 0) and stats.vacant == 1 and stats.valid_rows == 3


def test_load_errors():
    with pytest.raises(ValueError, match="ep_size"):
        rank_load(torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="outside"):
        expert_load(torch.tensor([[0, 4]]), 4)
    assert load_stats(torch.full((2, 2), -1), 4).max_over_mean == 1.0  # nothing routed


def test_gate_mass_retained_by_hand():
    # S = (0.4, 0.3, 0.2, 0.1): plain top-2 keeps 0.4 + 0.3 = 0.7. A routing that gave
    # the token experts 0 and 2 keeps 0.4 + 0.2 = 0.6: 0.6 / 0.7 retained.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    ratio = gate_mass_retained(torch.tensor([[0, 2]]), logits, 2)
    assert ratio == pytest.approx(0.6 / 0.7, abs=1e-6)
    # A vacant slot keeps nothing: 0.4 / 0.7.
    assert gate_mass_retained(torch.tensor([[0, -1]]), logits, 2) == pytest.approx(0.4 / 0.7, abs=1e-6)


def test_gate_mass_of_routing():
    # Plain top-k keeps everything it can; expert choice with a tight capacity keeps less,
    # "topk" fill at least as much as "drop" (it only adds experts).
    logits = torch.randn(256, 16, generator=torch.Generator().manual_seed(1)) * 3
    _, ids_big = expert_choice_topk(logits, 2, capacity_factor=16.0, impl="torch")
    assert gate_mass_retained(ids_big, logits, 2) == pytest.approx(1.0)
    _, drop = expert_choice_topk(logits, 2, capacity_factor=1.0, impl="torch")
    _, topk = expert_choice_topk(logits, 2, capacity_factor=1.0, fill="topk", impl="torch")
    g_drop, g_topk = gate_mass_retained(drop, logits, 2), gate_mass_retained(topk, logits, 2)
    assert 0 < g_drop < g_topk <= 1.0
    stats = load_stats(drop, 16, ep_size=4, router_logits=logits, top_k=2)
    assert stats.gate_mass_retained == pytest.approx(g_drop)
    # The load bound: C = ceil(256*2*1/16) = 32 per expert.
    assert stats.max_load <= 32
