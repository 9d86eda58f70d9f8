"""Checks that run *inside* a subprocess importing a real SGLang (see tests/sglang_env.py).

The integration tests run this module's functions through `sglang_env.run_python`, in a
fresh interpreter whose ``sglang`` is a patched copy, so that the environment variables
the patched model files read are those of the test. Each check raises AssertionError with
the details; `main` prints ``PASS <name>`` for every check that held.

The TopK under test is built from the patched model source itself: every ``TopK(...)``
call of the file is compiled from the source text and evaluated in the module's globals
(which bind ``TopK`` to the vendored class) with small stand-ins for ``config``,
``layer_id`` and ``self``.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import sys
import types
from pathlib import Path

import torch


def topk_calls(module) -> list:
    """(line, code object) of every ``TopK(...)`` call in the source of `module`."""
    source = Path(module.__file__).read_text()
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "TopK":
            calls.append((node.lineno, compile(ast.Expression(node), module.__file__, "eval")))
    return sorted(calls, key=lambda item: item[0])


def call_locals(num_experts: int, top_k: int, layer_id: int, norm: bool) -> dict:
    """The names a model file's ``TopK(...)`` call reads, as small stand-ins."""
    config = types.SimpleNamespace(num_experts_per_tok=top_k, moe_k=top_k, norm_topk_prob=norm,
                                   num_experts=num_experts)
    generator = torch.Generator().manual_seed(1234 + layer_id)
    bias = torch.rand(2, num_experts, generator=generator) * 0.05
    owner = types.SimpleNamespace(layer_id=layer_id, e_score_correction_bias=bias)
    return {"config": config, "layer_id": layer_id, "norm_topk_prob": norm, "self": owner}


def build(module, code, names: dict):
    return eval(code, vars(module), dict(names))


def plain_kwargs(topk) -> dict:
    """The arguments that SGLang's own TopK gets for the same call (ours removed)."""
    cfg = topk.topk_config
    return dict(top_k=cfg.top_k, layer_id=topk.layer_id, renormalize=cfg.renormalize,
                use_grouped_topk=cfg.use_grouped_topk, correction_bias=cfg.correction_bias,
                scoring_func=cfg.scoring_func)


def expected_expert_choice(topk, logits, num_token_non_padded=None, skip_vacant=False):
    """ROUTING.md's routing (the reference path) plus the layer's vacant-slot rule."""
    from sgl_ecpatch.runtime import expert_choice_topk

    cfg = topk.topk_config
    weights, ids = expert_choice_topk(
        logits, cfg.top_k, capacity_factor=topk.expert_capacity_factor, renormalize=cfg.renormalize,
        scoring_func=cfg.scoring_func, correction_bias=cfg.correction_bias,
        num_token_non_padded=num_token_non_padded, fill="drop", impl="reference")
    if not skip_vacant:
        n = logits.shape[0] if num_token_non_padded is None else int(num_token_non_padded)
        first = ids[:, :1].clamp(min=0).expand_as(ids)
        rows = torch.arange(ids.shape[0])[:, None]
        ids = torch.where((ids < 0) & (rows < n), first, ids)
    return weights, ids


def assert_same(actual, expected, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.equal(actual, expected), f"{what} differ:\n{actual}\nexpected\n{expected}"


def check_model_file(module_name: str, num_experts: int, top_k: int, norm: bool, switch: str) -> list:
    """Build every TopK of the patched file and compare with ROUTING.md (on) or SGLang (off)."""
    from sglang.srt.layers.moe.topk import TopK as SGLangTopK

    module = importlib.import_module(module_name)
    assert module.TopK.__module__ == "sglang.srt.layers.moe.expert_choice.topk_layer", module.TopK.__module__
    calls = topk_calls(module)
    assert calls, f"no TopK(...) call in {module.__file__}"
    passed = []
    for index, (line, code) in enumerate(calls):
        topk = build(module, code, call_locals(num_experts, top_k, layer_id=3, norm=norm))
        assert isinstance(topk, SGLangTopK)
        assert topk.use_expert_choice is (switch == "on"), (line, topk.use_expert_choice)
        generator = torch.Generator().manual_seed(line)
        for num_tokens, dtype, padded in ((37, torch.float32, None), (16, torch.bfloat16, 11), (1, torch.float32, None)):
            hidden = torch.randn(num_tokens, 8, generator=generator)
            logits = (torch.randn(num_tokens, num_experts, generator=generator) * 2).to(dtype)
            n = None if padded is None else torch.tensor(padded)
            out = topk.forward_native(hidden, logits.clone(), num_token_non_padded=n)
            assert type(out).__name__ == "StandardTopKOutput", type(out).__name__
            what = f"{module_name}:{line} T={num_tokens} {dtype} n={padded}"
            if switch == "on":
                weights, ids = expected_expert_choice(topk, logits, padded)
                assert_same(out.topk_weights, weights, what + " weights")
                assert_same(out.topk_ids, ids, what + " ids")
                assert torch.equal(out.router_logits, logits), what + " router_logits"
            else:
                own = SGLangTopK(**plain_kwargs(topk))
                ref = own.forward_native(hidden, logits.clone(), num_token_non_padded=n)
                assert_same(out.topk_weights, ref.topk_weights, what + " weights (off)")
                assert_same(out.topk_ids, ref.topk_ids, what + " ids (off)")
        passed.append(f"{module_name}:{line}:{switch}")
    return passed


# ------------------------------------------------------------------ layer features
# Each feature check builds the vendored TopK directly (as the patched qwen2_moe call
# would) and sets the environment variables it reads at construction in os.environ.

E, K = 60, 4


def _vendored_topk(**kwargs):
    from sglang.srt.layers.moe.expert_choice import TopK

    arguments = dict(top_k=K, renormalize=True, layer_id=5, use_expert_choice=True, expert_capacity_factor=1.25)
    arguments.update(kwargs)
    return TopK(**arguments)


def _own_topk(**kwargs):
    from sglang.srt.layers.moe.topk import TopK

    arguments = dict(top_k=K, renormalize=True, layer_id=5)
    arguments.update(kwargs)
    return TopK(**arguments)


def _logits(num_tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, E, generator=generator) * 2, torch.randn(num_tokens, 8, generator=generator)


def _env(**values):
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _raises(function, *needles):
    try:
        function()
    except (ValueError, NotImplementedError) as exc:
        message = str(exc)
        for needle in needles:
            assert needle in message, f"{needle!r} not in {message!r}"
        return message
    raise AssertionError(f"no error raised; expected one naming {needles}")


def check_adaptive_min_tokens():
    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS="32", SGLANG_EXPERT_CHOICE_LAYERS=None)
    topk = _vendored_topk()
    small, hidden = _logits(31)
    out = topk.forward_native(hidden, small)
    ref = _own_topk().forward_native(hidden, small)
    assert torch.equal(out.topk_ids, ref.topk_ids) and torch.equal(out.topk_weights, ref.topk_weights)
    big, hidden = _logits(32, seed=1)
    weights, ids = expected_expert_choice(topk, big)
    out = topk.forward_native(hidden, big)
    assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, weights)


def check_hybrid_layers():
    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS=None, SGLANG_EXPERT_CHOICE_LAYERS="0-3,7")
    logits, hidden = _logits(40)
    outside = _vendored_topk(layer_id=5)
    assert not outside.expert_choice_layer
    ref = _own_topk(layer_id=5).forward_native(hidden, logits)
    out = outside.forward_native(hidden, logits)
    assert torch.equal(out.topk_ids, ref.topk_ids) and torch.equal(out.topk_weights, ref.topk_weights)
    inside = _vendored_topk(layer_id=7)
    assert inside.expert_choice_layer
    weights, ids = expected_expert_choice(inside, logits)
    out = inside.forward_native(hidden, logits)
    assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, weights)


def check_bad_environment_fails_at_construction():
    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS="lots", SGLANG_EXPERT_CHOICE_LAYERS=None)
    _raises(_vendored_topk, "SGLANG_EXPERT_CHOICE_MIN_TOKENS")
    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS=None, SGLANG_EXPERT_CHOICE_LAYERS="3-1")
    _raises(_vendored_topk, "SGLANG_EXPERT_CHOICE_LAYERS", "3-1")
    _vendored_topk(use_expert_choice=False)  # switched off: the variables are not read
    _env(SGLANG_EXPERT_CHOICE_LAYERS=None)
    _raises(lambda: _vendored_topk(expert_capacity_factor=0.0), "expert_capacity_factor")


def check_refusals():
    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS=None, SGLANG_EXPERT_CHOICE_LAYERS=None)
    _raises(lambda: _vendored_topk(use_grouped_topk=True, num_expert_group=4, topk_group=2), "grouped top-k")
    _raises(lambda: _vendored_topk(custom_routing_function=lambda **kw: None), "custom_routing_function")
    from sglang.srt.layers.moe.topk import TopKOutputFormat
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    _raises(lambda: _vendored_topk(output_format=TopKOutputFormat.TRITON_KERNEL), "TRITON_KERNEL")
    bound = _vendored_topk()
    _raises(lambda: bound.bind_runner_backend(MoeRunnerBackend.TRITON_KERNELS), "triton_kernel", "--moe-runner-backend")
    # Off, the same arguments are SGLang's business: no refusal.
    _vendored_topk(use_expert_choice=False, use_grouped_topk=True, num_expert_group=4, topk_group=2)
    off = _vendored_topk(use_expert_choice=False)
    off.bind_runner_backend(MoeRunnerBackend.TRITON_KERNELS)
    assert off.topk_config.output_format == TopKOutputFormat.TRITON_KERNEL


def check_vacant_slots_per_runner():
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS=None, SGLANG_EXPERT_CHOICE_LAYERS=None)
    logits, hidden = _logits(37, seed=3)
    raw_weights, raw_ids = expected_expert_choice(_vendored_topk(), logits, skip_vacant=True)
    assert (raw_ids < 0).any(), "the input must leave some slots vacant"
    triton = _vendored_topk()
    triton.bind_runner_backend(MoeRunnerBackend.TRITON)  # skips -1: ids exactly ROUTING.md's
    out = triton.forward_native(hidden, logits)
    assert torch.equal(out.topk_ids, raw_ids) and torch.equal(out.topk_weights, raw_weights)
    for runner in (MoeRunnerBackend.FLASHINFER_CUTLASS, MoeRunnerBackend.MARLIN, None):
        topk = _vendored_topk()
        topk.bind_runner_backend(runner)
        out = topk.forward_native(hidden, logits)
        assert (out.topk_ids >= 0).all(), runner
        vacant = raw_ids < 0
        assert torch.equal(out.topk_ids[~vacant], raw_ids[~vacant]), runner
        assert (out.topk_weights[vacant] == 0).all() and torch.equal(out.topk_weights, raw_weights), runner


def check_padding_rows():
    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS=None, SGLANG_EXPERT_CHOICE_LAYERS=None)
    logits, hidden = _logits(24, seed=4)
    topk = _vendored_topk()
    out = topk.forward_native(hidden, logits, num_token_non_padded=torch.tensor(9))
    weights, ids = expected_expert_choice(topk, logits, 9)
    assert torch.equal(out.topk_ids, ids) and torch.equal(out.topk_weights, weights)
    assert (out.topk_ids[9:] == -1).all() and (out.topk_weights[9:] == 0).all()
    # Padding takes no capacity: the valid rows route as if the padding were not there.
    alone = topk.forward_native(hidden[:9], logits[:9])
    assert torch.equal(alone.topk_ids, out.topk_ids[:9]) and torch.equal(alone.topk_weights, out.topk_weights[:9])


def check_eplb_static_mapping():
    from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS=None, SGLANG_EXPERT_CHOICE_LAYERS=None)
    logits, hidden = _logits(29, seed=5)
    physical = torch.randperm(E, generator=torch.Generator().manual_seed(6)).to(torch.int32) + 100
    info = ExpertLocationDispatchInfo(
        ep_dispatch_algorithm="static",
        partial_logical_to_rank_dispatch_physical_map=physical,
        partial_logical_to_all_physical_map=physical[:, None],
        partial_logical_to_all_physical_map_num_valid=torch.ones(E, dtype=torch.int32),
        num_physical_experts=E + 100,
    )
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    topk = _vendored_topk()
    topk.bind_runner_backend(MoeRunnerBackend.TRITON)  # keep -1: the mapping must leave it alone
    out = topk.forward_native(hidden, logits, expert_location_dispatch_info=info, num_token_non_padded=torch.tensor(25))
    weights, ids = expected_expert_choice(topk, logits, 25, skip_vacant=True)
    mapped = torch.where(ids >= 0, physical[ids.clamp(min=0).long()], ids)
    assert torch.equal(out.topk_ids, mapped), (out.topk_ids, mapped)
    assert torch.equal(out.topk_weights, weights)


def check_stamp_defaults_and_signature():
    import inspect
    from pathlib import Path

    from sglang.srt.layers.moe import expert_choice
    from sglang.srt.layers.moe.expert_choice import TopK, topk_layer

    stamp = json.loads(Path(expert_choice.__file__).with_name("ecpatch_stamp.json").read_text())
    _env(SGLANG_EXPERT_CHOICE_MIN_TOKENS=None, SGLANG_EXPERT_CHOICE_LAYERS=None)
    settings = _vendored_topk().expert_choice_settings
    assert settings.min_tokens == (stamp["min_tokens"] or 0)
    parameters = inspect.signature(TopK).parameters
    assert "use_expert_choice" in parameters and "expert_capacity_factor" in parameters and "layer_id" in parameters
    assert topk_layer._SGLangTopK.__module__ == "sglang.srt.layers.moe.topk"


FEATURE_CHECKS = [name for name in dict(globals()) if name.startswith("check_") and name != "check_model_file"]


def run_features(names) -> None:
    import traceback

    for name in names:
        try:
            globals()[name]()
        except Exception:
            print("FAIL", name, flush=True)
            traceback.print_exc()
        else:
            print("PASS", name, flush=True)


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if "features" in spec:
        run_features(spec["features"])
        return
    for name in check_model_file(**spec):
        print("PASS", name, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
