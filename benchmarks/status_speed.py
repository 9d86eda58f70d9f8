"""How fast is `ecpatch status` compared with merely parsing the model files with libcst?

Goal (issue 2): `ecpatch status` over SGLang 0.5.23's srt/models folder (~300 files, 46 of
them call TopK) takes at most half the time of `libcst.parse_module` on those 46 files.

    .venv/bin/python benchmarks/status_speed.py [--version 0.5.23] [--repeat 3]

Downloads the wheel into the test cache on first use (tests/sglang_wheels.py). Prints the
best of `--repeat` runs for: libcst parsing of the TopK files, `ecpatch status` in-process
(table and --json, via typer's CliRunner), and `ecpatch status` as a fresh process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import libcst  # noqa: E402
import sglang_wheels  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from sgl_ecpatch import cli  # noqa: E402


def best_of(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="0.5.23")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    package = sglang_wheels.sglang_package(args.version)
    models = package / "srt" / "models"
    all_py = sorted(models.rglob("*.py"))
    topk_files = [p for p in all_py if "TopK(" in p.read_text(encoding="utf-8")]
    texts = [p.read_text(encoding="utf-8") for p in topk_files]
    print(f"SGLang {args.version}: {models}")
    print(f"  {len(all_py)} .py files, {len(topk_files)} with 'TopK('")

    parse = best_of(args.repeat, lambda: [libcst.parse_module(t) for t in texts])
    runner = CliRunner()

    def status(*extra):
        result = runner.invoke(cli.app, ["status", *extra, str(models)])
        assert result.exit_code == 0, result.stderr

    table = best_of(args.repeat, lambda: status())
    as_json = best_of(args.repeat, lambda: status("--json"))
    exe = [sys.executable, "-m", "sgl_ecpatch", "status", "--json", str(models)]
    process = best_of(args.repeat, lambda: subprocess.run(exe, check=True, capture_output=True,
                                                          env={**os.environ, "PYTHONPATH": str(REPO)}))

    print(f"  libcst.parse_module x {len(texts)} files : {parse:7.3f} s  (the bar: half is {parse / 2:.3f} s)")
    print(f"  ecpatch status (table, in-process)      : {table:7.3f} s  ({table / parse:.1%} of parsing)")
    print(f"  ecpatch status --json (in-process)      : {as_json:7.3f} s  ({as_json / parse:.1%} of parsing)")
    print(f"  ecpatch status --json (new process)     : {process:7.3f} s  ({process / parse:.1%} of parsing,"
          " interpreter start and imports included)")
    verdict = "meets" if table <= parse / 2 else "MISSES"
    print(f"  goal (status <= 50% of parsing): {verdict}")


if __name__ == "__main__":
    main()
