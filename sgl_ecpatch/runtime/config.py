"""Arguments, capacity and the adaptive / hybrid settings of expert-choice routing.

* `validate` checks the arguments of ``expert_choice_topk`` once, from shapes, dtypes
  and Python values only (never a tensor's contents, so no host-device sync), and
  returns a `RoutingPlan` that every path consumes.
* `capacity` is ROUTING.md's ``C = min(n, ceil(n * k * cf / E))`` (0 when n == 0) in
  exact integers, with ``cf`` taken as ``Fraction(cf).limit_denominator(1000)``.
  Note the consequence of that rule: a ``cf`` below 1/2000 becomes 0, so ``C == 0``
  and every slot is vacant with ``fill="drop"``.
* Adaptive and hybrid use: `ExpertChoiceSettings` (``min_tokens`` and a layer set),
  `parse_layer_spec` for strings like ``"0-15,32,40-47"``, and `settings_from_env`
  reading ``SGLANG_EXPERT_CHOICE_MIN_TOKENS`` / ``SGLANG_EXPERT_CHOICE_LAYERS``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import os
import re
from fractions import Fraction
from typing import FrozenSet, Mapping, Optional, Union

import torch

SCORING_FUNCS = ("softmax", "sigmoid")
FILL_POLICIES = ("drop", "topk")
BACKENDS = ("auto", "cuda", "torch", "reference")

ENV_BACKEND = "SGLANG_EXPERT_CHOICE_BACKEND"
ENV_MIN_TOKENS = "SGLANG_EXPERT_CHOICE_MIN_TOKENS"
ENV_LAYERS = "SGLANG_EXPERT_CHOICE_LAYERS"

CF_MAX_DENOMINATOR = 1000

__all__ = [
    "RoutingPlan",
    "validate",
    "capacity",
    "capacity_fraction",
    "resolve_backend",
    "resolve_num_valid_rows_host",
    "ExpertChoiceSettings",
    "parse_layer_spec",
    "parse_min_tokens",
    "settings_from_env",
]


# --------------------------------------------------------------------------- capacity


@functools.lru_cache(maxsize=64)
def capacity_fraction(capacity_factor: float) -> Fraction:
    """``cf`` as the exact fraction every path uses (denominator at most 1000)."""
    return Fraction(capacity_factor).limit_denominator(CF_MAX_DENOMINATOR)


def capacity(num_valid: int, top_k: int, num_experts: int, capacity_factor: Union[float, Fraction]) -> int:
    """Tokens each expert chooses: ``min(n, ceil(n * k * cf / E))``, 0 when ``n == 0``."""
    if num_valid <= 0:
        return 0
    cf = capacity_factor if isinstance(capacity_factor, Fraction) else capacity_fraction(capacity_factor)
    numerator = num_valid * top_k * cf.numerator
    denominator = num_experts * cf.denominator
    return min(num_valid, -(-numerator // denominator))


# ------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    """Validated arguments plus what the host knows before any kernel runs.

    ``num_valid`` is the number of valid rows when it is known on the host (None or
    a Python int was given); it is None when ``num_valid_tensor`` holds it on the
    device. ``max_capacity`` is ``capacity(T, ...)``, an upper bound of ``C(n)`` for
    every ``n <= T`` (capacity is non-decreasing in n), used for static shapes.
    """

    num_tokens: int
    num_experts: int
    top_k: int
    cf: Fraction
    renormalize: bool
    scoring_func: str
    correction_bias: Optional[torch.Tensor]
    fill: str
    num_valid: Optional[int]
    num_valid_tensor: Optional[torch.Tensor]
    max_capacity: int

    @property
    def host_capacity(self) -> Optional[int]:
        """C when n is known on the host, else None."""
        if self.num_valid is None:
            return None
        return capacity(self.num_valid, self.top_k, self.num_experts, self.cf)

    def capacity_of(self, num_valid: int) -> int:
        return capacity(num_valid, self.top_k, self.num_experts, self.cf)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate(
    router_logits,
    top_k,
    *,
    capacity_factor=1.25,
    renormalize=True,
    scoring_func="softmax",
    correction_bias=None,
    num_token_non_padded=None,
    fill="drop",
) -> RoutingPlan:
    """Check every argument of ``expert_choice_topk``; raise ValueError naming it."""
    if not isinstance(router_logits, torch.Tensor):
        raise ValueError(f"router_logits must be a torch.Tensor [T, E], got {type(router_logits).__name__}")
    if router_logits.dim() != 2:
        raise ValueError(
            f"router_logits must be 2-D [T, E], got {router_logits.dim()}-D shape {tuple(router_logits.shape)}"
        )
    if not router_logits.is_floating_point():
        raise ValueError(
            f"router_logits must be floating point (float32, bfloat16 or float16), got {router_logits.dtype}"
        )
    num_tokens, num_experts = (int(s) for s in router_logits.shape)
    if num_experts < 1:
        raise ValueError(f"router_logits must have E >= 1 experts (columns), got E = {num_experts}")
    if num_tokens + num_experts > 2**30:
        raise ValueError(f"router_logits is too large: T + E must be <= 2**30, got {num_tokens} + {num_experts}")

    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}] (E = {num_experts}), got {top_k!r}")
    top_k = operator.index(top_k)

    if (
        isinstance(capacity_factor, bool)
        or not isinstance(capacity_factor, numbers.Real)
        or not math.isfinite(capacity_factor)
        or not capacity_factor > 0
    ):
        raise ValueError(
            f"capacity_factor must be a finite number > 0 (e.g. 1.25), got {capacity_factor!r}"
        )
    cf = capacity_fraction(capacity_factor)

    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
    if fill not in FILL_POLICIES:
        raise ValueError(f"fill must be one of {FILL_POLICIES}, got {fill!r}")

    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor):
            raise ValueError(
                f"correction_bias must be None or a tensor of shape [{num_experts}], got {type(correction_bias).__name__}"
            )
        if correction_bias.dim() != 1 or correction_bias.shape[0] != num_experts:
            raise ValueError(
                f"correction_bias must have shape [{num_experts}] (E), got {tuple(correction_bias.shape)}"
            )
        if not correction_bias.is_floating_point():
            raise ValueError(f"correction_bias must be floating point, got {correction_bias.dtype}")
        if correction_bias.device != router_logits.device:
            raise ValueError(
                f"correction_bias must be on the device of router_logits ({router_logits.device}), "
                f"got {correction_bias.device}"
            )

    num_valid: Optional[int] = num_tokens
    num_valid_tensor = None
    if num_token_non_padded is None:
        pass
    elif isinstance(num_token_non_padded, torch.Tensor):
        if num_token_non_padded.numel() != 1 or num_token_non_padded.dim() > 1:
            raise ValueError(
                "num_token_non_padded must be None, an int, or a 0-d / 1-element integer tensor, "
                f"got a tensor of shape {tuple(num_token_non_padded.shape)}"
            )
        if num_token_non_padded.is_floating_point() or num_token_non_padded.is_complex() or (
            num_token_non_padded.dtype == torch.bool
        ):
            raise ValueError(
                f"num_token_non_padded must be an integer tensor, got dtype {num_token_non_padded.dtype}"
            )
        if num_token_non_padded.device == router_logits.device:
            # Never read on the host (CPU inputs take the same path as CUDA ones).
            num_valid = None
            num_valid_tensor = num_token_non_padded.reshape(())
        elif num_token_non_padded.device.type == "cpu":
            # A CPU tensor with device logits is read on the host: no device sync, but
            # inside a CUDA graph its value is baked in (pass it on the device there).
            num_valid = min(max(int(num_token_non_padded.reshape(())), 0), num_tokens)
        else:
            raise ValueError(
                f"num_token_non_padded must be on the device of router_logits ({router_logits.device}) "
                f"or on the CPU, got {num_token_non_padded.device}"
            )
    elif _is_int(num_token_non_padded):
        num_valid = min(max(int(num_token_non_padded), 0), num_tokens)
    else:
        raise ValueError(
            "num_token_non_padded must be None, an int, or a 0-d / 1-element integer tensor, "
            f"got {type(num_token_non_padded).__name__}"
        )

    return RoutingPlan(
        num_tokens=num_tokens,
        num_experts=num_experts,
        top_k=top_k,
        cf=cf,
        renormalize=bool(renormalize),
        scoring_func=scoring_func,
        correction_bias=correction_bias,
        fill=fill,
        num_valid=num_valid,
        num_valid_tensor=num_valid_tensor,
        max_capacity=capacity(num_tokens, top_k, num_experts, cf),
    )


def resolve_num_valid_rows_host(num_token_non_padded, num_tokens: int) -> int:
    """Host value of n (clamped to [0, T]); syncs on a device tensor. Off the hot path only."""
    if num_token_non_padded is None:
        return num_tokens
    if isinstance(num_token_non_padded, torch.Tensor):
        value = int(num_token_non_padded.reshape(()).item())
    else:
        value = int(num_token_non_padded)
    return min(max(value, 0), num_tokens)


def resolve_backend(impl: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """``impl`` or, when None, ``$SGLANG_EXPERT_CHOICE_BACKEND`` (default "auto")."""
    if impl is None:
        env = os.environ if environ is None else environ
        raw = env.get(ENV_BACKEND, "").strip().lower()
        if not raw:
            return "auto"
        if raw not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS}, got {raw!r}")
        return raw
    if impl not in BACKENDS:
        raise ValueError(f"impl must be None or one of {BACKENDS}, got {impl!r}")
    return impl


# -------------------------------------------------------------- adaptive / hybrid use


_DIGITS = re.compile(r"[0-9]+")


def parse_layer_spec(spec: str) -> FrozenSet[int]:
    """Parse ``"0-15,32,40-47"`` into ``frozenset({0, ..., 15, 32, 40, ..., 47})``.

    Parts are separated by commas; a part is a layer id ``N`` or an inclusive range
    ``A-B`` with ``A <= B``; spaces around parts and numbers are allowed. Raises
    ValueError quoting the offending part (empty part, not a number, negative,
    reversed range) or the whole spec when it is empty.
    """
    if not isinstance(spec, str):
        raise ValueError(f"layer spec must be a string like '0-15,32', got {type(spec).__name__}")
    if not spec.strip():
        raise ValueError("layer spec is empty: give layer ids and ranges like '0-15,32,40-47'")
    layers = set()
    for part in spec.split(","):
        text = part.strip()
        if not text:
            raise ValueError(f"layer spec {spec!r} has an empty part (two commas or a trailing comma)")
        if "-" in text:
            low_text, sep, high_text = (s.strip() for s in text.partition("-"))
            if not (_DIGITS.fullmatch(low_text) and _DIGITS.fullmatch(high_text)):
                raise ValueError(
                    f"layer spec part {text!r} is not a layer id or a range A-B of non-negative integers"
                )
            low, high = int(low_text), int(high_text)
            if low > high:
                raise ValueError(f"layer spec part {text!r} is a reversed range (start {low} > end {high})")
            layers.update(range(low, high + 1))
        else:
            if not _DIGITS.fullmatch(text):
                raise ValueError(f"layer spec part {text!r} is not a non-negative integer layer id")
            layers.add(int(text))
    return frozenset(layers)


def parse_min_tokens(value: Union[str, int], name: str = "min_tokens") -> int:
    """A non-negative integer token threshold; ValueError naming ``name`` otherwise."""
    if _is_int(value):
        number = int(value)
    else:
        text = str(value).strip()
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class ExpertChoiceSettings:
    """Plain settings the SGLang layer holds: when to route with expert choice.

    ``min_tokens``: below this many rows (``T``, known on the host) the layer keeps its
    own top-k path; 0 means always expert choice. ``layers``: the layer ids that use
    expert choice, or None for every layer.
    """

    min_tokens: int = 0
    layers: Optional[FrozenSet[int]] = None

    def __post_init__(self):
        object.__setattr__(self, "min_tokens", parse_min_tokens(self.min_tokens))
        if self.layers is not None and not isinstance(self.layers, frozenset):
            object.__setattr__(self, "layers", frozenset(self.layers))

    def layer_enabled(self, layer_id: Optional[int]) -> bool:
        """Whether this layer routes with expert choice at all (hybrid use).

        A layer without an id (older SGLang releases) counts as enabled only when
        no layer set is given.
        """
        if self.layers is None:
            return True
        return layer_id is not None and layer_id in self.layers

    def use_expert_choice(self, layer_id: Optional[int], num_tokens: int) -> bool:
        """Decision for one forward: layer enabled and ``num_tokens >= min_tokens``."""
        return self.layer_enabled(layer_id) and num_tokens >= self.min_tokens


def settings_from_env(
    environ: Optional[Mapping[str, str]] = None,
    *,
    default_min_tokens: int = 0,
    default_layers: Optional[FrozenSet[int]] = None,
) -> ExpertChoiceSettings:
    """Settings from ``SGLANG_EXPERT_CHOICE_MIN_TOKENS`` and ``SGLANG_EXPERT_CHOICE_LAYERS``.

    Unset or blank variables keep the defaults; ``LAYERS=all`` (or ``*``) means every
    layer. Bad values raise ValueError naming the variable.
    """
    env = os.environ if environ is None else environ
    min_tokens = default_min_tokens
    raw = env.get(ENV_MIN_TOKENS, "").strip()
    if raw:
        try:
            min_tokens = parse_min_tokens(raw, name=ENV_MIN_TOKENS)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    layers = default_layers
    raw = env.get(ENV_LAYERS, "").strip()
    if raw:
        if raw.lower() in ("all", "*"):
            layers = None
        else:
            try:
                layers = parse_layer_spec(raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_LAYERS}={raw!r}: {exc}") from None
    return ExpertChoiceSettings(min_tokens=min_tokens, layers=layers)


def describe_layers(layers: Optional[FrozenSet[int]]) -> str:
    """Inverse of `parse_layer_spec` in compact form (``"0-15,32"``), "all" for None."""
    if layers is None:
        return "all"
    ordered = sorted(layers)
    parts = []
    start = prev = None
    for layer in ordered:
        if start is None:
            start = prev = layer
        elif layer == prev + 1:
            prev = layer
        else:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = layer
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)

