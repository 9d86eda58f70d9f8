"""The vendored TopK on the oldest TopK shape (0.4.9.post3), without installing that release.

SGLang 0.4.9.post3's TopK keeps its settings as attributes (no ``topk_config``), has no
``layer_id``, no ``bind_runner_backend``, no ``_resolve_routing_inputs``, returns a plain
``TopKOutput`` NamedTuple, and its MoE package has no runner-backend setting. The stand-in
below is written here with exactly that interface (a plain softmax top-k inside), so the
version-detecting paths of templates/topk_layer.py run: the layer must build, pass the
old constructor through, route as ROUTING.md says, fill vacant slots (no runner that
skips -1 is known there), map EPLB ids, and refuse a layer set it cannot apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from sgl_ecpatch import vendor

REPO = Path(__file__).resolve().parent.parent.parent

OLD_TOPK = '''
from typing import Callable, NamedTuple, Optional

import torch


class TopKOutput(NamedTuple):
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


class CustomOp(torch.nn.Module):
    """Like SGLang's CustomOp of that time: the forward is picked once, in __init__."""

    def __init__(self):
        super().__init__()
        self._forward_method = self.forward_cuda

    def forward(self, *args, **kwargs):
        return self._forward_method(*args, **kwargs)


class TopK(CustomOp):
    def __init__(self, top_k: int, *, use_grouped_topk: bool = False, topk_group: Optional[int] = None,
                 num_expert_group: Optional[int] = None, renormalize: bool = True,
                 num_fused_shared_experts: int = 0, custom_routing_function: Optional[Callable] = None,
                 scoring_func: str = "softmax", correction_bias: Optional[torch.Tensor] = None,
                 routed_scaling_factor: Optional[float] = None):
        super().__init__()
        self.top_k = top_k
        self.use_grouped_topk = use_grouped_topk
        self.renormalize = renormalize
        self.num_fused_shared_experts = num_fused_shared_experts
        self.custom_routing_function = custom_routing_function
        self.correction_bias = correction_bias
        self.routed_scaling_factor = routed_scaling_factor

    def forward_native(self, hidden_states, router_logits, *, num_token_non_padded=None,
                       expert_location_dispatch_info=None):
        weights, ids = router_logits.float().softmax(-1).topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return TopKOutput(weights, ids.to(torch.int32), router_logits)

    def forward_cuda(self, hidden_states, router_logits, **kwargs):
        return self.forward_native(hidden_states, router_logits, **kwargs)
'''

OLD_DISPATCH = '''
from dataclasses import dataclass

import torch


@dataclass
class ExpertLocationDispatchInfo:
    ep_dispatch_algorithm: str
    partial_logical_to_rank_dispatch_physical_map: torch.Tensor


def topk_ids_logical_to_physical(topk_ids, info):
    if info is None:
        return topk_ids
    return info.partial_logical_to_rank_dispatch_physical_map[topk_ids.long()].to(topk_ids.dtype)
'''

CHECKS = '''
import os, torch
from sgl_ecpatch.runtime import expert_choice_topk
from sglang.srt.layers.moe.topk import TopK as OldTopK, TopKOutput
from sglang.srt.layers.moe.expert_choice import TopK
from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

E, K, T = 32, 4, 23
g = torch.Generator().manual_seed(0)
logits, hidden = torch.randn(T, E, generator=g) * 2, torch.randn(T, 8, generator=g)

off = TopK(K, renormalize=False)
ref = OldTopK(K, renormalize=False).forward_native(hidden, logits)
out = off.forward_native(hidden, logits)
assert type(out) is TopKOutput and torch.equal(out.topk_ids, ref.topk_ids) and torch.equal(out.topk_weights, ref.topk_weights)
assert off._forward_method.__func__ is OldTopK.forward_cuda  # switched off: SGLang's own, picked in __init__
assert torch.equal(off(hidden, logits).topk_ids, ref.topk_ids)

on = TopK(K, renormalize=True, use_expert_choice=True, expert_capacity_factor=1.0)
weights, ids = expert_choice_topk(logits, K, capacity_factor=1.0, renormalize=True, impl="reference")
assert (ids < 0).any()
filled = torch.where(ids < 0, ids[:, :1].clamp(min=0).expand_as(ids), ids)
out = on(hidden, logits)  # through CustomOp's dispatch: our forward_cuda
assert type(out) is TopKOutput
assert torch.equal(out.topk_ids, filled) and torch.equal(out.topk_weights, weights)
out = on.forward_native(hidden, logits, num_token_non_padded=torch.tensor(20))
w20, i20 = expert_choice_topk(logits, K, capacity_factor=1.0, num_token_non_padded=20, impl="reference")
assert (out.topk_ids[20:] == -1).all() and torch.equal(out.topk_weights, w20)

table = torch.arange(E, dtype=torch.int32).flip(0) + 1000
info = ExpertLocationDispatchInfo("static", table)
out = on.forward_native(hidden, logits, expert_location_dispatch_info=info)
assert torch.equal(out.topk_ids, table[filled.long()])

for bad, needle in ((dict(use_grouped_topk=True, num_expert_group=4, topk_group=2), "grouped"),
                    (dict(num_fused_shared_experts=1), "shared")):
    try:
        TopK(K, use_expert_choice=True, **bad)
    except ValueError as exc:
        assert needle in str(exc), exc
    else:
        raise AssertionError(bad)

os.environ["SGLANG_EXPERT_CHOICE_LAYERS"] = "0-3"
try:
    TopK(K, use_expert_choice=True)
except ValueError as exc:
    assert "layer_id" in str(exc) and "SGLANG_EXPERT_CHOICE_LAYERS" in str(exc), exc
else:
    raise AssertionError("a layer set without layer ids must be refused")
TopK(K)  # switched off: the layer set is not read
print("ALL PASSED")
'''


def make_old_tree(parent: Path) -> Path:
    root = parent / "sglang"
    for package in ("", "srt", "srt/layers", "srt/layers/moe", "srt/eplb"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    (root / "srt" / "layers" / "moe" / "topk.py").write_text(OLD_TOPK)
    (root / "srt" / "eplb" / "expert_location_dispatch.py").write_text(OLD_DISPATCH)
    return root


def test_vendored_topk_on_the_0_4_9_post3_interface(tmp_path):
    root = make_old_tree(tmp_path)
    vendor.install(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHECKS)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ALL PASSED" in proc.stdout


# ---- the 0.5.1-0.5.22 shape: topk_config, optional layer_id, output_format, global backends

MID_MOE_INIT = '''
from enum import Enum


class MoeRunnerBackend(Enum):
    AUTO = "auto"
    TRITON = "triton"
    TRITON_KERNELS = "triton_kernel"
    FLASHINFER_TRTLLM = "flashinfer_trtllm"


class MoeA2ABackend(Enum):
    NONE = "none"
    DEEPEP = "deepep"


RUNNER = MoeRunnerBackend.AUTO
A2A = MoeA2ABackend.NONE


def get_moe_runner_backend():
    return RUNNER


def get_moe_a2a_backend():
    return A2A
'''

MID_TOPK = '''
from dataclasses import dataclass
from enum import IntEnum, auto
from typing import Callable, NamedTuple, Optional

import torch


class TopKOutputFormat(IntEnum):
    STANDARD = auto()
    TRITON_KERNEL = auto()
    BYPASSED = auto()


class StandardTopKOutput(NamedTuple):
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


@dataclass
class TopKConfig:
    top_k: int
    use_grouped_topk: bool = False
    renormalize: bool = True
    num_fused_shared_experts: int = 0
    custom_routing_function: Optional[Callable] = None
    correction_bias: Optional[torch.Tensor] = None
    routed_scaling_factor: Optional[float] = None
    apply_routed_scaling_factor_on_output: bool = False
    output_format: Optional[TopKOutputFormat] = None


class TopK(torch.nn.Module):
    def __init__(self, top_k: int, *, layer_id: Optional[int] = None, use_grouped_topk: bool = False,
                 topk_group: Optional[int] = None, num_expert_group: Optional[int] = None,
                 renormalize: bool = True, num_fused_shared_experts: int = 0,
                 custom_routing_function: Optional[Callable] = None, scoring_func: str = "softmax",
                 correction_bias: Optional[torch.Tensor] = None, quant_config=None,
                 routed_scaling_factor: Optional[float] = None,
                 apply_routed_scaling_factor_on_output: Optional[bool] = False,
                 output_format: Optional[TopKOutputFormat] = None):
        super().__init__()
        self.layer_id = layer_id
        self.topk_config = TopKConfig(top_k=top_k, use_grouped_topk=use_grouped_topk, renormalize=renormalize,
                                      num_fused_shared_experts=num_fused_shared_experts,
                                      custom_routing_function=custom_routing_function,
                                      correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
                                      apply_routed_scaling_factor_on_output=bool(apply_routed_scaling_factor_on_output),
                                      output_format=output_format)

    def forward_native(self, hidden_states, router_logits, *, num_token_non_padded=None,
                       expert_location_dispatch_info=None):
        weights, ids = router_logits.float().softmax(-1).topk(self.topk_config.top_k, dim=-1)
        if self.topk_config.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return StandardTopKOutput(weights, ids.to(torch.int32), router_logits)

    def forward_cuda(self, hidden_states, router_logits, **kwargs):
        return self.forward_native(hidden_states, router_logits, **kwargs)
'''

MID_CHECKS = '''
import os, torch
import sglang.srt.layers.moe as moe
from sgl_ecpatch.runtime import expert_choice_topk
from sglang.srt.layers.moe.topk import TopKOutputFormat, StandardTopKOutput
from sglang.srt.layers.moe.expert_choice import TopK

E, K, T = 32, 4, 23
g = torch.Generator().manual_seed(1)
logits, hidden = torch.randn(T, E, generator=g) * 2, torch.randn(T, 8, generator=g)
weights, ids = expert_choice_topk(logits, K, capacity_factor=1.0, renormalize=False, impl="reference")
assert (ids < 0).any()
filled = torch.where(ids < 0, ids[:, :1].clamp(min=0).expand_as(ids), ids)

def refused(needle, **kwargs):
    try:
        TopK(K, use_expert_choice=True, **kwargs)
    except ValueError as exc:
        assert needle in str(exc), exc
    else:
        raise AssertionError(kwargs)

for runner, a2a, expect in ((moe.MoeRunnerBackend.AUTO, moe.MoeA2ABackend.NONE, filled),
                            (moe.MoeRunnerBackend.TRITON, moe.MoeA2ABackend.NONE, ids),
                            (moe.MoeRunnerBackend.AUTO, moe.MoeA2ABackend.DEEPEP, ids)):
    moe.RUNNER, moe.A2A = runner, a2a
    on = TopK(K, layer_id=2, renormalize=False, use_expert_choice=True, expert_capacity_factor=1.0)
    out = on.forward_cuda(hidden, logits)
    assert type(out) is StandardTopKOutput
    assert torch.equal(out.topk_ids, expect), (runner, a2a)
    assert torch.equal(out.topk_weights, weights), (runner, a2a)

moe.RUNNER, moe.A2A = moe.MoeRunnerBackend.FLASHINFER_TRTLLM, moe.MoeA2ABackend.NONE
refused("flashinfer_trtllm")
TopK(K)  # off: SGLang's business
moe.RUNNER = moe.MoeRunnerBackend.TRITON_KERNELS
refused("triton_kernel")
moe.RUNNER = moe.MoeRunnerBackend.AUTO
refused("TRITON_KERNEL", output_format=TopKOutputFormat.TRITON_KERNEL)
TopK(K, use_expert_choice=True, output_format=TopKOutputFormat.STANDARD)

os.environ["SGLANG_EXPERT_CHOICE_LAYERS"] = "2"
refused("layer_id")  # layer_id is optional in these releases: none given
assert TopK(K, layer_id=2, use_expert_choice=True).expert_choice_layer
assert not TopK(K, layer_id=3, use_expert_choice=True).expert_choice_layer
print("ALL PASSED")
'''


def test_vendored_topk_on_the_0_5_1_to_0_5_22_interface(tmp_path):
    root = make_old_tree(tmp_path)
    (root / "srt" / "layers" / "moe" / "__init__.py").write_text(MID_MOE_INIT)
    (root / "srt" / "layers" / "moe" / "topk.py").write_text(MID_TOPK)
    vendor.install(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MID_CHECKS)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ALL PASSED" in proc.stdout
