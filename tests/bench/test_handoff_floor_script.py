"""benchmarks/handoff_floor.py: without a GPU it says so and exits 0; its CUDA source builds
for sm_90 and its entry point reports a CUDA error instead of crashing where no device is."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def handoff_floor_module():
    spec = importlib.util.spec_from_file_location("handoff_floor", ROOT / "benchmarks" / "handoff_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_it_says_so():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "handoff_floor.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA GPU, nothing to time" in proc.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_cuda_source_builds_and_refuses_without_a_device(tmp_path):
    hf = handoff_floor_module()  # the script's own build command and library handle
    lib_path = tmp_path / "handoff_floor.so"
    out = subprocess.run(hf.nvcc_command(lib_path, "90"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning" not in out.stderr.lower(), out.stderr[-2000:]
    lib = hf.open_library(lib_path)
    if not torch.cuda.is_available():
        for variant in range(4):  # every variant reports the missing device as a CUDA error code
            assert lib.hf_run(variant, 8, 2, None, None, None) != 0
