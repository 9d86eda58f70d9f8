"""Every model file of real SGLang releases that calls TopK (wheels downloaded at test time).

The wheels of the releases in `tests/sglang_wheels.VERSIONS` are fetched once with
``pip download --no-deps`` into the git-ignored cache; nothing from them is committed.
"""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

import sglang_wheels
from sgl_ecpatch import cli, vendor
from sgl_ecpatch.patcher import (
    Changed,
    Mode,
    PatchOptions,
    State,
    Unchanged,
    disable_source,
    enable_source,
    find_calls,
)

pytestmark = pytest.mark.network


def _model_files(package):
    files = sglang_wheels.model_files_with_topk(package)
    assert files, f"no TopK callers found under {package}"
    return files


def test_every_topk_caller_round_trips(sglang_release):
    version, package = sglang_release
    patched_files = 0
    for path in _model_files(package):
        name = f"{version}:{path.relative_to(package)}"
        source = path.read_bytes().decode("utf-8")
        calls = find_calls(source)
        if not calls:  # "TopK(" only in a definition such as `class TopK(...)`
            continue

        result = enable_source(source, filename=name)
        assert isinstance(result, (Changed, Unchanged)), (name, result)
        if isinstance(result, Unchanged):
            assert all(c.state == State.unsupported and c.reason for c in calls), name
            continue
        patched_files += 1
        compile(result.new_code, name, "exec")
        after = find_calls(result.new_code)
        assert len(after) == len(calls)
        assert all(c.state in (State.env, State.unsupported) for c in after), name
        assert [c.state == State.unsupported for c in after] == [c.state == State.unsupported for c in calls]
        assert all(c.capacity_factor == 1.25 for c in after if c.state == State.env)

        assert isinstance(enable_source(result.new_code, filename=name), Unchanged), f"{name}: not idempotent"
        removed = disable_source(result.new_code, filename=name)
        assert isinstance(removed, Changed) and removed.new_code.encode() == path.read_bytes(), \
            f"{name}: disable --remove does not restore the release bytes"

        on = enable_source(result.new_code, PatchOptions(mode=Mode.on, capacity_factor=2.0), filename=name)
        assert isinstance(on, Changed)
        assert "import os  # ecpatch" not in on.new_code
        assert all(c.state == State.on and c.capacity_factor == 2.0 for c in find_calls(on.new_code)
                   if c.state != State.unsupported)
        off = disable_source(on.new_code, remove=False, filename=name)
        assert isinstance(off, Changed)
        compile(off.new_code, name, "exec")
        assert all(c.state == State.false and c.capacity_factor == 2.0 for c in find_calls(off.new_code)
                   if c.state != State.unsupported)
        assert "from sglang.srt.layers.moe.expert_choice import TopK  # ecpatch" in off.new_code
    assert patched_files >= 10


# Facts of the releases the issue names: (relative path, number of calls, supported calls).
SHAPES = {
    "0.5.23": [
        ("srt/models/qwen2_moe.py", 1, 1),
        ("srt/models/dbrx.py", 1, 1),  # positional top_k
        ("srt/models/ernie45_moe_vl.py", 2, 2),  # two calls, text and vision experts
        ("srt/models/deepseek_v2.py", 1, 0),  # TopK(**topk_kwargs) with use_grouped_topk=True; HashTopK untouched
        ("srt/models/interns1pro.py", 1, 0),  # self.mlp.topk with a custom routing function
        ("srt/models/dots3_common/modeling.py", 1, 0),  # in a sub-package; grouped
    ],
    "0.5.7": [
        ("srt/models/qwen2_moe.py", 1, 1),
        ("srt/models/dbrx.py", 1, 1),
    ],
}


def test_known_shapes(sglang_release):
    version, package = sglang_release
    for rel, n_calls, n_supported in SHAPES[version]:
        calls = find_calls((package / rel).read_text(encoding="utf-8"))
        assert len(calls) == n_calls, rel
        assert sum(c.state != State.unsupported for c in calls) == n_supported, rel
    if version == "0.5.23":
        targets = [c.target for c in find_calls((package / "srt/models/ernie45_moe_vl.py").read_text())]
        assert targets == ["self.text_experts_topk", "self.vision_experts_topk"]
        (interns,) = find_calls((package / "srt/models/interns1pro.py").read_text())
        assert interns.target == "self.mlp.topk" and "custom routing function" in interns.reason
        (deepseek,) = find_calls((package / "srt/models/deepseek_v2.py").read_text())
        assert "via **topk_kwargs" in deepseek.reason


def test_cli_over_a_release_models_folder(sglang_wheel, tmp_path, monkeypatch):
    """enable / status / disable on a copy of 0.5.23's srt/models with SGLang's topk.py beside it."""
    package = sglang_wheel("0.5.23")
    root = tmp_path / "sglang"
    shutil.copytree(package / "srt" / "models", root / "srt" / "models")
    (root / "srt" / "layers" / "moe").mkdir(parents=True)
    shutil.copy(package / "srt" / "layers" / "moe" / "topk.py", root / "srt" / "layers" / "moe" / "topk.py")
    monkeypatch.setattr(vendor, "install", lambda root, **kw: "installed (test stub)")
    monkeypatch.setattr(vendor, "remove", lambda root, **kw: True)
    before = {p: p.read_bytes() for p in root.rglob("*.py")}
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    result = runner.invoke(cli.app, ["enable", "sglang"])
    assert result.exit_code == 0, result.stderr
    assert "left unchanged: use_grouped_topk=True" in result.stderr

    status = runner.invoke(cli.app, ["status", "--json", "sglang"])
    assert status.exit_code == 0
    import json

    rows = json.loads(status.stdout)
    assert len(rows) >= 47
    assert {r["state"] for r in rows} == {"env", "unsupported"}
    qwen2 = next(r for r in rows if r["file"].endswith("models/qwen2_moe.py"))
    importers = {i["file"]: i["names"] for i in qwen2["imported_by"]}
    assert "Qwen2MoeSparseMoeBlock" in importers["sglang/srt/models/qwen3_next.py"]
    assert all(r["reason"] for r in rows if r["state"] == "unsupported")

    result = runner.invoke(cli.app, ["disable", "sglang"])
    assert result.exit_code == 0, result.stderr
    assert {p: p.read_bytes() for p in root.rglob("*.py")} == before
