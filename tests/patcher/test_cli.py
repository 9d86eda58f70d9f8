"""The ecpatch CLI through typer's CliRunner: exit codes, stdout vs stderr, git apply."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_ecpatch import cli, vendor

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sglang"
MODEL_REL = Path("sglang/srt/models/qwen2_moe.py")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    """A copy of examples/sglang in tmp_path, which is also the working directory."""
    shutil.copytree(EXAMPLE, tmp_path / "sglang")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def vendor_calls(monkeypatch) -> list:
    """Record the vendoring hooks instead of running them (the integration area tests them)."""
    calls: list = []
    installed: dict = {}

    def install(root, *, min_tokens=None, layers=None, dry_run=False):
        calls.append(("install", Path(root), min_tokens, layers, dry_run))
        if layers == "bad":
            raise ValueError("--layers: cannot read 'bad'")
        if not dry_run:
            installed[Path(root)] = {"min_tokens": min_tokens, "layers": layers}
        return "installed sglang.srt.layers.moe.expert_choice"

    def remove(root, *, dry_run=False):
        calls.append(("remove", Path(root), dry_run))
        return True

    monkeypatch.setattr(vendor, "install", install)
    monkeypatch.setattr(vendor, "remove", remove)
    monkeypatch.setattr(vendor, "vendored_info", lambda root: installed.get(Path(root)))
    return calls


def invoke(runner, *args, env=None):
    return runner.invoke(cli.app, [str(a) for a in args], env=env)


def test_help(runner):
    for flag in ("-h", "--help"):
        result = invoke(runner, flag)
        assert result.exit_code == 0
        assert "enable" in result.stdout and "disable" in result.stdout and "status" in result.stdout
    result = invoke(runner, "enable", "-h")
    assert result.exit_code == 0 and "--capacity-factor" in result.stdout


def test_diff_on_the_example_applies_with_git_apply(runner, tree, vendor_calls):
    original = (tree / MODEL_REL).read_bytes()
    result = invoke(runner, "enable", "--diff", MODEL_REL)
    assert result.exit_code == 1, result.stderr
    assert result.stdout.startswith(f"--- a/{MODEL_REL.as_posix()}\n+++ b/{MODEL_REL.as_posix()}\n")
    assert "+            expert_capacity_factor=1.25,\n" in result.stdout
    assert "1 file to change" in result.stderr and "1 file to change" not in result.stdout
    assert (tree / MODEL_REL).read_bytes() == original  # --diff writes nothing
    assert vendor_calls == []

    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    patch = tree / "enable.patch"
    patch.write_bytes(result.stdout_bytes)
    subprocess.run(["git", "apply", "--check", patch.name], cwd=tree, check=True)
    subprocess.run(["git", "apply", patch.name], cwd=tree, check=True)
    applied = (tree / MODEL_REL).read_bytes()

    (tree / MODEL_REL).write_bytes(original)
    assert invoke(runner, "enable", MODEL_REL).exit_code == 0
    assert (tree / MODEL_REL).read_bytes() == applied


def test_check_exit_codes(runner, tree, vendor_calls):
    before = (tree / MODEL_REL).read_bytes()
    result = invoke(runner, "enable", "--check", "sglang")
    assert result.exit_code == 1 and result.stdout == ""
    assert (tree / MODEL_REL).read_bytes() == before
    assert invoke(runner, "enable", "sglang").exit_code == 0
    assert invoke(runner, "enable", "--check", "sglang").exit_code == 0
    assert invoke(runner, "enable", "--diff", "sglang").exit_code == 0
    assert invoke(runner, "disable", "--check", "sglang").exit_code == 1


def test_dry_run_writes_nothing(runner, tree, vendor_calls):
    before = (tree / MODEL_REL).read_bytes()
    result = invoke(runner, "enable", "--dry-run", "sglang")
    assert result.exit_code == 0
    assert "would be patched" in result.stderr
    assert (tree / MODEL_REL).read_bytes() == before
    assert vendor_calls == [("install", (tree / "sglang").resolve(), None, None, True)]


def test_enable_status_disable_round_trip(runner, tree, vendor_calls):
    original = (tree / MODEL_REL).read_bytes()
    result = invoke(runner, "enable", "--min-tokens", "64", "--layers", "0-1", "sglang")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    root = (tree / "sglang").resolve()
    assert vendor_calls == [("install", root, 64, "0-1", True), ("install", root, 64, "0-1", False)]
    text = (tree / MODEL_REL).read_text()
    assert 'use_expert_choice=os.environ.get("SGLANG_EXPERT_CHOICE", "0") == "1"' in text

    again = invoke(runner, "enable", "sglang")
    assert again.exit_code == 0 and "unchanged" in again.stderr

    for value, resolved in (("1", True), ("0", False)):
        status = invoke(runner, "status", "--json", "sglang", env={"SGLANG_EXPERT_CHOICE": value})
        assert status.exit_code == 0
        (row,) = json.loads(status.stdout)
        assert row["file"] == MODEL_REL.as_posix() and row["target"] == "self.topk"
        assert (row["state"], row["capacity_factor"], row["reason"]) == ("env", 1.25, None)
        assert (row["env_var"], row["env_value"]) == ("SGLANG_EXPERT_CHOICE", resolved)

    off = invoke(runner, "disable", "--set-false", "sglang")
    assert off.exit_code == 0
    assert "use_expert_choice=False," in (tree / MODEL_REL).read_text()
    (row,) = json.loads(invoke(runner, "status", "--json", MODEL_REL).stdout)
    assert row["state"] == "false"
    assert not any(c[0] == "remove" for c in vendor_calls)  # set-false keeps the vendored package

    restored = invoke(runner, "disable", "sglang")
    assert restored.exit_code == 0
    assert (tree / MODEL_REL).read_bytes() == original
    assert vendor_calls[-1] == ("remove", root, False)


def test_status_table_and_importers(runner, tree, vendor_calls):
    sibling = tree / "sglang" / "srt" / "models" / "qwen3_next.py"
    sibling.write_text("from sglang.srt.models.qwen2_moe import Qwen2MoeSparseMoeBlock\n")
    assert invoke(runner, "enable", "--mode", "on", "sglang").exit_code == 0
    result = invoke(runner, "status", "sglang")
    assert result.exit_code == 0
    assert f"{MODEL_REL.as_posix()}:31" in result.stdout
    assert "qwen3_next.py" in result.stdout
    assert "vendored package: min_tokens=None, layers=None" in result.stdout
    assert "SGLANG_EXPERT_CHOICE_BACKEND" in result.stdout
    (row,) = json.loads(invoke(runner, "status", "--json", "sglang").stdout)
    assert row["state"] == "on"
    assert row["imported_by"] == [{"file": "sglang/srt/models/qwen3_next.py", "names": ["Qwen2MoeSparseMoeBlock"]}]


def test_status_shows_the_kernel_knobs_of_this_shell(runner, tree, vendor_calls, monkeypatch):
    assert invoke(runner, "enable", "sglang").exit_code == 0
    for name in ("SGL_ECPATCH_KERNEL_PDL", "SGL_ECPATCH_KERNEL_FUSED_MAX"):
        monkeypatch.delenv(name, raising=False)
    result = invoke(runner, "status", "sglang")
    assert "kernel knobs in this shell: none set (the measured defaults)" in result.stdout
    result = invoke(runner, "status", "sglang",
                    env={"SGL_ECPATCH_KERNEL_PDL": "0", "SGL_ECPATCH_KERNEL_FUSED_MAX": "lots"})
    assert result.exit_code == 0
    assert "SGL_ECPATCH_KERNEL_PDL=0 (PDL off)" in result.stdout
    assert "SGL_ECPATCH_KERNEL_FUSED_MAX='lots' (not an integer: every kernel call would raise)" in result.stdout


def test_status_reports_unsupported_with_reason(runner, tree):
    model = tree / MODEL_REL
    model.write_text(model.read_text().replace("layer_id=layer_id,", "layer_id=layer_id,\n            use_grouped_topk=True,"))
    result = invoke(runner, "enable", "sglang")
    assert result.exit_code == 0
    assert "left unchanged: use_grouped_topk=True" in result.stderr
    (row,) = json.loads(invoke(runner, "status", "--json", "sglang").stdout)
    assert row["state"] == "unsupported" and "grouped top-k" in row["reason"]


def test_errors_are_one_line_each_and_the_batch_goes_on(runner, tree, vendor_calls):
    models = tree / "sglang" / "srt" / "models"
    (models / "broken.py").write_text("from sglang.srt.layers.moe.topk import TopK\nx = TopK(top_k=2\n")
    (models / "latin1.py").write_bytes("# caf\xe9\nx = TopK(top_k=2)\n".encode("latin-1"))
    result = invoke(runner, "enable", "sglang", "missing_dir")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any("broken.py:2: syntax error" in line and "hint:" in line for line in errors)
    assert any("latin1.py: not UTF-8" in line for line in errors)
    assert any("missing_dir: no such file or directory" in line for line in errors)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "use_expert_choice" in (tree / MODEL_REL).read_text()  # the good file was still patched
    assert (models / "broken.py").read_text().endswith("x = TopK(top_k=2\n")


@pytest.mark.parametrize("args", [
    ["--capacity-factor", "nan"], ["--capacity-factor", "inf"], ["--capacity-factor", "0"],
    ["--capacity-factor", "-1"], ["--env-var", "NOT-A-NAME"], ["--mode", "sometimes"],
    ["--min-tokens", "-5"],
])
def test_usage_errors_exit_2(runner, tree, args):
    before = (tree / MODEL_REL).read_bytes()
    result = invoke(runner, "enable", *args, "sglang")
    assert result.exit_code == 2
    assert (tree / MODEL_REL).read_bytes() == before


def test_install_value_error_is_a_usage_error_before_any_write(runner, tree, vendor_calls):
    before = (tree / MODEL_REL).read_bytes()
    result = invoke(runner, "enable", "--layers", "bad", "sglang")
    assert result.exit_code == 2
    assert "cannot read 'bad'" in result.stderr
    assert (tree / MODEL_REL).read_bytes() == before


def test_folder_without_models_and_file_without_calls(runner, tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    for command in ("enable", "disable", "status"):
        result = invoke(runner, command, tmp_path)
        assert result.exit_code == 2
        assert result.stderr.count("error:") == 1 and "no SGLang model file" in result.stderr
    result = invoke(runner, "enable", tmp_path / "a.py")
    assert result.exit_code == 2 and "no TopK(...) call" in result.stderr


def test_outside_an_sglang_tree_warns(runner, tmp_path, vendor_calls):
    model = tmp_path / "model.py"
    shutil.copy(EXAMPLE / "srt" / "models" / "qwen2_moe.py", model)
    result = invoke(runner, "enable", model)
    assert result.exit_code == 0
    assert "not inside an SGLang tree" in result.stderr
    assert "use_expert_choice" in model.read_text()
    assert vendor_calls == []


def test_crlf_file_round_trip(runner, tree, vendor_calls):
    model = tree / MODEL_REL
    crlf = model.read_bytes().replace(b"\n", b"\r\n")
    model.write_bytes(crlf)
    assert invoke(runner, "enable", "sglang").exit_code == 0
    patched = model.read_bytes()
    assert patched.count(b"\r\n") == patched.count(b"\n") and b"expert_capacity_factor" in patched
    assert invoke(runner, "disable", "sglang").exit_code == 0
    assert model.read_bytes() == crlf


def test_verbose_shows_the_traceback_of_an_internal_error(runner, tree, monkeypatch):
    from sgl_ecpatch.patcher import rewrite

    def boom(self, original_node, updated_node):
        raise RuntimeError("boom")

    monkeypatch.setattr(rewrite.CallRewriter, "leave_Call", boom)
    quiet = invoke(runner, "enable", "sglang")
    assert quiet.exit_code == 2 and "internal error: RuntimeError: boom" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    loud = invoke(runner, "enable", "--verbose", "sglang")
    assert loud.exit_code == 2 and "Traceback" in loud.stderr
    global_flag = invoke(runner, "--verbose", "enable", "sglang")
    assert global_flag.exit_code == 2 and "Traceback" in global_flag.stderr
    again = invoke(runner, "enable", "sglang")  # the flag does not stick to the next invocation
    assert "Traceback" not in again.stderr


def test_other_areas_commands_get_the_same_error_handling(runner):
    guarded = [info.callback for info in cli.app.registered_commands]
    assert guarded and all(getattr(cb, "_ecpatch_guarded", False) for cb in guarded)


def test_status_without_path_and_without_sglang_is_a_usage_error(runner, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sglang" else real(name, *a))
    result = invoke(runner, "status")
    assert result.exit_code == 2
    assert "no sglang package is installed" in result.stderr and "hint:" in result.stderr


def test_status_without_path_uses_the_installed_package(runner, tree, monkeypatch):
    monkeypatch.syspath_prepend(str(tree))  # examples' `sglang` becomes importable
    result = invoke(runner, "status", "--json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["file"].endswith("sglang/srt/models/qwen2_moe.py") and row["state"] == "off"
