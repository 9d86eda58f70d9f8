"""The dispatcher: impl / environment choice, CUDA fallback, and vendorability."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

import sgl_ecpatch.runtime as runtime
from routing_oracles import assert_same_routing
from sgl_ecpatch.runtime import expert_choice_topk

RUNTIME_DIR = Path(runtime.__file__).resolve().parent


def test_env_chooses_the_backend(monkeypatch):
    logits = torch.randn(8, 6)
    calls = []
    monkeypatch.setattr(runtime, "run_reference", lambda x, plan: calls.append("reference") or (None, None))
    monkeypatch.setattr(runtime, "run_torch", lambda x, plan: calls.append("torch") or (None, None))
    monkeypatch.setenv("SGLANG_EXPERT_CHOICE_BACKEND", "reference")
    expert_choice_topk(logits, 2)
    monkeypatch.setenv("SGLANG_EXPERT_CHOICE_BACKEND", "torch")
    expert_choice_topk(logits, 2)
    monkeypatch.delenv("SGLANG_EXPERT_CHOICE_BACKEND")
    expert_choice_topk(logits, 2)  # auto on the CPU: the torch path, no warning
    expert_choice_topk(logits, 2, impl="reference")  # explicit impl beats the env
    assert calls == ["reference", "torch", "torch", "reference"]
    monkeypatch.setenv("SGLANG_EXPERT_CHOICE_BACKEND", "fast")
    with pytest.raises(ValueError, match="SGLANG_EXPERT_CHOICE_BACKEND"):
        expert_choice_topk(logits, 2)


def test_cuda_impl_on_cpu_input_raises():
    with pytest.raises(RuntimeError, match="CUDA"):
        expert_choice_topk(torch.randn(4, 4), 2, impl="cuda")


def test_auto_on_cpu_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING):
        expert_choice_topk(torch.randn(4, 4), 2, impl="auto")
    assert not caplog.records


def test_auto_falls_back_once_with_the_reason(monkeypatch, caplog):
    """A CUDA input with an unusable kernel: torch path, one warning naming the reason."""
    monkeypatch.setattr(runtime, "_fallback_warned", False)
    monkeypatch.setattr(runtime, "_load_kernel", lambda device, plan: (None, "no nvcc on this host"))

    class FakeDevice:
        type = "cuda"

    seen = []

    def fake_run_torch(x, plan):
        seen.append(plan.num_tokens)
        return "routed"

    monkeypatch.setattr(runtime, "run_torch", fake_run_torch)
    logits = torch.randn(4, 4)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: FakeDevice()), raising=False)
    with caplog.at_level(logging.WARNING, logger="sgl_ecpatch.runtime"):
        assert expert_choice_topk(logits, 2, impl="auto") == "routed"
        assert expert_choice_topk(logits, 2, impl="auto") == "routed"
        with pytest.raises(RuntimeError, match="no nvcc on this host"):
            expert_choice_topk(logits, 2, impl="cuda")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no nvcc on this host" in warnings[0].getMessage()
    assert seen == [4, 4]


def test_all_impls_agree_on_cpu():
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    assert_same_routing(
        expert_choice_topk(logits, 4, impl="reference"), expert_choice_topk(logits, 4, impl="auto")
    )


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


@pytest.mark.parametrize("path", sorted(RUNTIME_DIR.glob("*.py")), ids=lambda p: p.name)
def test_runtime_imports_torch_stdlib_and_relative_only(path):
    """runtime/ is copied verbatim into SGLang trees: torch, the stdlib and relative imports only."""
    import sys

    stdlib = set(sys.stdlib_module_names)
    for level, module in _imports(path):
        if level > 0:
            continue
        top = module.split(".")[0]
        assert top == "torch" or top in stdlib or top == "__future__", f"{path.name} imports {module}"
        assert top != "sgl_ecpatch", f"{path.name} must import the package relatively"


def test_runtime_parses_as_python39():
    for path in RUNTIME_DIR.glob("*.py"):
        ast.parse(path.read_text(), feature_version=(3, 9))


def test_kernel_shape_limits_fall_back(monkeypatch):
    """A loadable kernel that does not take this shape: auto uses torch, cuda says why."""
    import sgl_ecpatch.runtime.kernel as kernel

    class FakeKernel:
        @staticmethod
        def supports(num_experts, top_k):
            return "too many experts for the kernel" if num_experts > 4 else None

    monkeypatch.setattr(kernel, "try_load", lambda device=None: (FakeKernel, None))
    plan = runtime.validate(torch.zeros(2, 8), 2)
    assert runtime._load_kernel(torch.device("cpu"), plan) == (None, "too many experts for the kernel")
    plan = runtime.validate(torch.zeros(2, 4), 2)
    assert runtime._load_kernel(torch.device("cpu"), plan) == (FakeKernel, None)
