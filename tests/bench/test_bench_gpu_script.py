"""benchmarks/bench_gpu.py runs (on the CPU here: it degrades) and writes the shipped table's format."""

import subprocess
import sys
from pathlib import Path

from bench_fixtures import needs_runtime

from sgl_ecpatch.bench import table as table_mod

ROOT = Path(__file__).resolve().parents[2]


@needs_runtime
def test_bench_gpu_script_writes_a_measured_table_advise_can_read(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--out", str(tmp_path),
                           "--quick", "--presets", "mixtral"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"measured_table.json", "bench.csv", "summary.md", "log.txt"} <= names
    table = table_mod.load(tmp_path / "measured_table.json")  # exactly the shipped format
    assert table["placeholder"] is True  # no GPU here
    assert {r["method"] for r in table["routing"] if r["us"] is not None} >= {"topk", "ec-torch-drop"}
    assert {r["skew"] for r in table["load"]} == {"uniform", "zipf-0.25", "zipf-0.5", "zipf-1", "corr-0.5"}
    log = (tmp_path / "log.txt").read_text()
    assert "layer benchmark and the expert-time measurement are skipped" in log
    summary = (tmp_path / "summary.md").read_text()
    assert "What `ecpatch advise` concludes" in summary and "| mixtral | 8 |" in summary
