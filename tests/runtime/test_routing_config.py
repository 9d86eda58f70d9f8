"""Argument checks, capacity arithmetic, layer specs and environment settings."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from sgl_ecpatch.runtime import (
    ExpertChoiceSettings,
    capacity,
    capacity_fraction,
    describe_layers,
    expert_choice_topk,
    parse_layer_spec,
    settings_from_env,
)
from sgl_ecpatch.runtime.config import resolve_backend


@pytest.mark.parametrize(
    "n, k, E, cf, expected",
    [
        (0, 4, 60, 1.25, 0),  # no valid rows, no capacity
        (1, 4, 60, 1.25, 1),  # ceil(1*4*5/4 / 60) = ceil(1/12) = 1
        (16, 8, 128, 1.25, 2),  # ceil(16*8*5 / (128*4)) = ceil(1.25) = 2
        (1024, 8, 128, 1.25, 80),  # 1024*8*5/512 = 80 exactly: no rounding up
        (1025, 8, 128, 1.25, 81),
        (4, 4, 4, 16.0, 4),  # min(n, ...): never more than the valid rows
        (100, 1, 3, 1 / 3, 12),  # 1/3 -> Fraction(1, 3): ceil(100/9) = 12
        (7, 2, 5, 0.0004, 0),  # limit_denominator(1000) rounds 0.0004 to 0
    ],
)
def test_capacity(n, k, E, cf, expected):
    assert capacity(n, k, E, cf) == expected


def test_capacity_fraction_is_exact():
    assert capacity_fraction(1.25) == Fraction(5, 4)
    assert capacity_fraction(0.1) == Fraction(1, 10)  # not the binary 0.1000000000000000055...
    assert capacity_fraction(1 / 3) == Fraction(1, 3)


@pytest.mark.parametrize(
    "logits, k, kwargs, names",
    [
        (torch.zeros(4), 1, {}, ["router_logits", "2-D"]),
        (torch.zeros(2, 3, 4), 1, {}, ["router_logits", "2-D"]),
        (torch.zeros(4, 0), 1, {}, ["E >= 1"]),
        (torch.zeros(4, 3, dtype=torch.int64), 1, {}, ["router_logits", "floating"]),
        (torch.zeros(4, 3), 0, {}, ["top_k", "[1, 3]"]),
        (torch.zeros(4, 3), 4, {}, ["top_k", "[1, 3]"]),
        (torch.zeros(4, 3), 1.5, {}, ["top_k"]),
        (torch.zeros(4, 3), True, {}, ["top_k"]),
        (torch.zeros(4, 3), 1, {"capacity_factor": 0}, ["capacity_factor", "> 0"]),
        (torch.zeros(4, 3), 1, {"capacity_factor": -1.0}, ["capacity_factor"]),
        (torch.zeros(4, 3), 1, {"capacity_factor": math.inf}, ["capacity_factor", "finite"]),
        (torch.zeros(4, 3), 1, {"capacity_factor": math.nan}, ["capacity_factor"]),
        (torch.zeros(4, 3), 1, {"capacity_factor": "1.25"}, ["capacity_factor"]),
        (torch.zeros(4, 3), 1, {"scoring_func": "softplus"}, ["scoring_func", "softmax", "sigmoid"]),
        (torch.zeros(4, 3), 1, {"fill": "pad"}, ["fill", "drop", "topk"]),
        (torch.zeros(4, 3), 1, {"correction_bias": torch.zeros(4)}, ["correction_bias", "[3]"]),
        (torch.zeros(4, 3), 1, {"correction_bias": torch.zeros(1, 3)}, ["correction_bias", "[3]"]),
        (torch.zeros(4, 3), 1, {"num_token_non_padded": 2.0}, ["num_token_non_padded"]),
        (torch.zeros(4, 3), 1, {"num_token_non_padded": torch.tensor([1, 2])}, ["num_token_non_padded"]),
        (torch.zeros(4, 3), 1, {"num_token_non_padded": torch.tensor(1.0)}, ["num_token_non_padded", "integer"]),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
def test_bad_arguments_name_the_argument(logits, k, kwargs, names, impl):
    with pytest.raises(ValueError) as info:
        expert_choice_topk(logits, k, impl=impl, **kwargs)
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_num_token_non_padded_is_clamped():
    logits = torch.randn(3, 4)
    full = expert_choice_topk(logits, 2, impl="torch")
    for n in (3, 10, torch.tensor(10), torch.tensor([99], dtype=torch.int32)):
        assert torch.equal(expert_choice_topk(logits, 2, num_token_non_padded=n, impl="torch")[1], full[1])
    for n in (0, -5, torch.tensor(-5)):
        assert (expert_choice_topk(logits, 2, num_token_non_padded=n, impl="torch")[1] == -1).all()


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0-3,7", {0, 1, 2, 3, 7}),
        (" 5 ", {5}),
        ("0-15,32,40-47", set(range(16)) | {32} | set(range(40, 48))),
        ("2-2, 1", {1, 2}),
        ("3,3,1-4", {1, 2, 3, 4}),
    ],
)
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec) == frozenset(expected)


@pytest.mark.parametrize(
    "spec, offending",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0-3,,7", "empty part"),
        ("0-3,", "empty part"),
        ("0-3,x", "'x'"),
        ("15-0", "'15-0'"),
        ("-3", "'-3'"),
        ("1-2-3", "'1-2-3'"),
        ("4.5", "'4.5'"),
        ("1,two-3", "'two-3'"),
        ("²", "'²'"),
    ],
)
def test_parse_layer_spec_errors_quote_the_part(spec, offending):
    with pytest.raises(ValueError) as info:
        parse_layer_spec(spec)
    assert offending in str(info.value)


def test_describe_layers_round_trips():
    layers = parse_layer_spec("0-15,32,40-47")
    assert describe_layers(layers) == "0-15,32,40-47"
    assert parse_layer_spec(describe_layers(layers)) == layers
    assert describe_layers(None) == "all"


def test_settings_from_env():
    settings = settings_from_env({"SGLANG_EXPERT_CHOICE_MIN_TOKENS": "256", "SGLANG_EXPERT_CHOICE_LAYERS": "0-1,5"})
    assert settings == ExpertChoiceSettings(min_tokens=256, layers=frozenset({0, 1, 5}))
    assert settings.use_expert_choice(5, 256) and not settings.use_expert_choice(5, 255)
    assert not settings.use_expert_choice(2, 4096)
    assert not settings.use_expert_choice(None, 4096)  # no layer id: only without a layer set

    default = settings_from_env({})
    assert default == ExpertChoiceSettings() and default.use_expert_choice(None, 1)
    assert settings_from_env({"SGLANG_EXPERT_CHOICE_LAYERS": "all"}).layers is None
    assert settings_from_env({"SGLANG_EXPERT_CHOICE_MIN_TOKENS": " "}, default_min_tokens=64).min_tokens == 64


@pytest.mark.parametrize(
    "env, variable, part",
    [
        ({"SGLANG_EXPERT_CHOICE_MIN_TOKENS": "many"}, "SGLANG_EXPERT_CHOICE_MIN_TOKENS", "many"),
        ({"SGLANG_EXPERT_CHOICE_MIN_TOKENS": "-1"}, "SGLANG_EXPERT_CHOICE_MIN_TOKENS", "-1"),
        ({"SGLANG_EXPERT_CHOICE_LAYERS": "0-3,9-7"}, "SGLANG_EXPERT_CHOICE_LAYERS", "9-7"),
    ],
)
def test_settings_from_env_errors_name_the_variable(env, variable, part):
    with pytest.raises(ValueError) as info:
        settings_from_env(env)
    assert variable in str(info.value) and part in str(info.value)


def test_settings_reject_negative_min_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        ExpertChoiceSettings(min_tokens=-1)


def test_backend_from_env():
    assert resolve_backend(None, {}) == "auto"
    assert resolve_backend(None, {"SGLANG_EXPERT_CHOICE_BACKEND": " Torch "}) == "torch"
    assert resolve_backend("reference", {"SGLANG_EXPERT_CHOICE_BACKEND": "torch"}) == "reference"
    with pytest.raises(ValueError, match="SGLANG_EXPERT_CHOICE_BACKEND"):
        resolve_backend(None, {"SGLANG_EXPERT_CHOICE_BACKEND": "triton"})
    with pytest.raises(ValueError, match="impl"):
        resolve_backend("triton", {})
