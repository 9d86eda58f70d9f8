#!/usr/bin/env bash
# One call on the lent GPU machine: the GPU tests of every area, then the routing benchmark.
# Usage there (carry .whl):  bash benchmarks/gpu_batch.sh [tests|routing|kernel|layer|all]
# Wheels: .whl/*.whl (SGLang 0.5.23), .whl/gpu (what `import sglang` needs, from
# `python tests/sglang_env.py --download-gpu-wheels .whl/gpu`), .whl/py (pytest).
set -uo pipefail
what=${1:-all}
out=${OUT:-/tmp/ecpatch-out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl/gpu/*.whl .whl/py/*.whl >/dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
[[ -n ${ECPATCH_STUB_SGL_KERNEL:-} ]] && export PYTHONPATH=$PYTHONPATH:$PWD/tests/gpu_stubs
nvidia-smi -L
if [[ $what == tests || $what == all ]]; then
    python3 -m pytest -q -rs -p no:cacheprovider tests/runtime/test_routing_gpu.py tests/kernel/test_kernel_gpu.py \
        tests/integration/test_gpu_topk.py tests/bench/test_gpu_bench.py 2>&1 | tee "$out/gpu_tests.log" | tail -40
fi
if [[ $what == routing || $what == all ]]; then
    python3 benchmarks/routing_torch.py --no-kernel --tokens 1 16 64 256 512 1024 4096 16384 2>&1 | tee "$out/routing_torch.md"
fi
if [[ $what == kernel || $what == all ]]; then
    python3 benchmarks/kernel_bench.py 2>&1 | tee "$out/kernel_bench.md" | tail -42
fi
if [[ $what == layer || $what == all ]]; then
    python3 benchmarks/bench_gpu.py --out "$out" 2>&1 | tail -60
fi
