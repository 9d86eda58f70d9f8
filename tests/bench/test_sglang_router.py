"""`ecpatch bench` times SGLang's own router when SGLang imports (real SGLang 0.5.23 on the CPU)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ : sglang_env

pytestmark = pytest.mark.network

CODE = """
import json, torch
from sgl_ecpatch.bench.routing import bench_routing, methods_for
methods = {m.name: m for m in methods_for(8, names=("sglang", "topk"))}
logits = torch.randn(33, 128, generator=torch.Generator().manual_seed(0))
ws, ids = methods["sglang"].fn(logits)
wt, idt = methods["topk"].fn(logits)
rows = bench_routing([(128, 8)], [1, 16], methods=("sglang",), quick=True)
print(json.dumps({
    "reason": methods["sglang"].reason,
    "same_ids": torch.equal(ids.sort(1).values.long(), idt.sort(1).values.long()),
    "same_weights": torch.allclose(ws.sort(1).values.float(), wt.sort(1).values, atol=1e-6),
    "timed": [r.us is not None for r in rows],
}))
"""


def test_sglang_router_is_found_matches_plain_topk_and_is_timed():
    sglang_env = pytest.importorskip("sglang_env")
    try:
        site = sglang_env.ensure_site()
    except sglang_env.SGLangUnavailable as exc:
        pytest.skip(f"SGLang could not be installed here: {exc}")
    proc = sglang_env.run_python(CODE, sglang_parent=site, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reason"] is None
    assert result["same_ids"] and result["same_weights"]
    assert result["timed"] == [True, True]
