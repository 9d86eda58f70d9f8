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


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    for name in check_model_file(**spec):
        print("PASS", name, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
