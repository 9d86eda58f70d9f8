"""GPU: the vendored TopK's CUDA forward inside a captured CUDA graph, with padding rows.

Needs a CUDA GPU and an importable SGLang 0.5.23 (skips otherwise). On the lent GPU
machine (no network) SGLang and the packages its imports need travel as wheels in
``.whl/`` (``python tests/sglang_env.py --download-gpu-wheels .whl`` fetches them here):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && \\
    python3 -m pytest -q tests/integration/test_gpu_topk.py

The test copies that ``sglang`` package, vendors the expert-choice package into the
copy, and in a subprocess builds ``TopK(top_k=8, ..., use_expert_choice=True)`` for a
qwen3_moe-like router (128 experts). For each routing backend ("auto": the CUDA kernel
when it builds, and "torch") and each runner policy (Triton keeps -1 in vacant slots;
no runner bound fills them), it captures ``forward_cuda`` with a device-side
``num_token_non_padded`` in a CUDA graph, replays it on fresh logits with several
padding counts, and compares them with the reference routing (computed on the CPU): ids exactly,
weights bit for bit on the CPU and within 1e-6 on the GPU (CPU and GPU exp differ in the last bit).
Without a GPU the same sequence runs eagerly through ``forward_native`` on the CPU
(`test_same_sequence_eagerly_on_cpu`, in CI), so the script itself is tested everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent

CHECK = textwrap.dedent("""
    import os, torch
    from sgl_ecpatch.runtime import expert_choice_topk
    from sglang.srt.layers.moe.expert_choice import TopK
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    T, E, K = 64, 128, 8
    ON_GPU = torch.cuda.is_available()  # on a CPU the same sequence runs eagerly through forward_native
    device = torch.device("cuda" if ON_GPU else "cpu")
    generator = torch.Generator(device="cpu").manual_seed(0)

    def expected(logits, n, keep_vacant):
        weights, ids = expert_choice_topk(logits.cpu(), K, capacity_factor=1.25, renormalize=True,
                                          num_token_non_padded=n, impl="reference")
        if not keep_vacant:
            first = ids[:, :1].clamp(min=0).expand_as(ids)
            rows = torch.arange(T)[:, None]
            ids = torch.where((ids < 0) & (rows < n), first, ids)
        return weights, ids

    for backend in ("auto", "torch"):
        os.environ["SGLANG_EXPERT_CHOICE_BACKEND"] = backend
        for runner in (MoeRunnerBackend.TRITON, None):
            topk = TopK(top_k=K, renormalize=True, layer_id=0, use_expert_choice=True, expert_capacity_factor=1.25)
            topk.bind_runner_backend(runner)
            forward = topk.forward_cuda if ON_GPU else topk.forward_native
            hidden = torch.zeros(T, 16, device=device, dtype=torch.bfloat16)
            logits = torch.zeros(T, E, device=device, dtype=torch.bfloat16)
            n_dev = torch.full((), T, device=device, dtype=torch.int32)
            if ON_GPU:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):  # warm up (and build the kernel) outside the graph
                        forward(hidden, logits, num_token_non_padded=n_dev)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = forward(hidden, logits, num_token_non_padded=n_dev)
            for n in (T, 50, 17, 1, 0):
                fresh = (torch.randn(T, E, generator=generator) * 3).to(torch.bfloat16)
                logits.copy_(fresh.to(device))
                n_dev.fill_(n)
                if ON_GPU:
                    for tensor in (out.topk_ids, out.topk_weights):
                        tensor.fill_(77)  # poison: a replay must write every element
                    graph.replay()
                    torch.cuda.synchronize()
                else:
                    out = forward(hidden, logits, num_token_non_padded=n_dev)
                weights, ids = expected(fresh, n, keep_vacant=runner is not None)
                what = f"backend={backend} runner={runner} n={n}"
                assert torch.equal(out.topk_ids.cpu(), ids), what + " ids"
                if ON_GPU:  # GPU vs CPU float32 exp differ in the last bit: ROUTING's 1e-6 (issue 5)
                    error = (out.topk_weights.cpu() - weights).abs().max().item()
                    assert error <= 1e-6, what + f" weights differ by {error}"
                else:
                    assert torch.equal(out.topk_weights, weights), what + " weights"
                assert (out.topk_ids[n:] == -1).all() and (out.topk_weights[n:] == 0).all(), what + " padding"
            print("PASS", backend, runner, flush=True)
""")


def _sglang_package():
    spec = importlib.util.find_spec("sglang")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    sys.path.insert(0, str(TESTS))
    import sglang_env

    site = sglang_env.site_dir()
    if (site / ".ecpatch-complete").is_file():
        return site / "sglang"
    return None


def _run_check(tmp_path: Path, package: Path, device: str) -> subprocess.CompletedProcess:
    """Copy `package`, vendor the expert-choice package into it, run CHECK there."""
    shutil.copytree(package, tmp_path / "sglang", ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    from sgl_ecpatch import vendor

    vendor.install(tmp_path / "sglang")
    sys.path.insert(0, str(TESTS))
    import sglang_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")]), str(sglang_env.site_dir()), str(REPO)])
    program = sglang_env.BOOTSTRAP.replace("{device}", device) + "\n" + CHECK
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=900)


@pytest.mark.gpu
def test_cuda_forward_in_cuda_graph_matches_reference(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    package = _sglang_package()
    if package is None:
        pytest.skip("SGLang is not importable here (see this module's docstring)")
    proc = _run_check(tmp_path, package, "cuda")
    missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", proc.stderr)
    if proc.returncode != 0 and missing and "PASS" not in proc.stdout:
        pytest.skip(f"SGLang does not import here: no module {missing.group(1)!r} (carry its wheel in .whl/)")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    assert proc.stdout.count("PASS") == 4, proc.stdout


@pytest.mark.network
def test_same_sequence_eagerly_on_cpu(tmp_path):
    """CHECK without a GPU: the same replays through forward_native (CI runs this one)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU test covers this machine")
    sys.path.insert(0, str(TESTS))
    import sglang_env

    proc = _run_check(tmp_path, sglang_env.ensure_site() / "sglang", "cpu")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    assert proc.stdout.count("PASS") == 4, proc.stdout
