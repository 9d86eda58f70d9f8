"""The pure core and the file plumbing: results instead of exceptions, options, inspection."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pytest

from sgl_ecpatch.patcher import (
    Changed,
    Failed,
    Inspection,
    Mode,
    PatchOptions,
    State,
    Unchanged,
    disable_source,
    enable_source,
    env_value,
    find_calls,
    inspect_source,
)
from sgl_ecpatch.patcher import files

MODEL = '''from sglang.srt.layers.moe.topk import TopK


class Block:
    def __init__(self, config, layer_id):
        self.topk = TopK(
            top_k=config.num_experts_per_tok,
            renormalize=True,
            layer_id=layer_id,
        )
'''


# ---- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cf", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True])
def test_bad_capacity_factor_is_refused(cf):
    options = PatchOptions(capacity_factor=cf)
    assert "capacity-factor" in options.validate()
    result = enable_source(MODEL, options)
    assert isinstance(result, Failed) and "capacity-factor" in result.error


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "A$"])
def test_bad_env_var_is_refused(name):
    assert "env-var" in PatchOptions(env_var=name).validate()


def test_capacity_factor_and_env_var_are_written():
    result = enable_source(MODEL, PatchOptions(env_var="MY_EC", capacity_factor=2))
    assert isinstance(result, Changed)
    assert 'use_expert_choice=os.environ.get("MY_EC", "0") == "1",' in result.new_code
    assert "expert_capacity_factor=2.0," in result.new_code
    (call,) = result.calls
    assert (call.state, call.env_var, call.capacity_factor) == (State.env, "MY_EC", 2.0)


def test_enable_again_with_other_options_updates_in_place():
    first = enable_source(MODEL).new_code
    second = enable_source(first, PatchOptions(capacity_factor=1.5, env_var="OTHER")).new_code
    assert second.count("use_expert_choice=") == 1 and second.count("expert_capacity_factor=") == 1
    assert "expert_capacity_factor=1.5" in second and '"OTHER"' in second
    assert len(second.splitlines()) == len(first.splitlines())
    on = enable_source(second, PatchOptions(mode=Mode.on)).new_code
    assert "import os  # ecpatch" not in on  # no env-mode call left: the added import goes
    assert "use_expert_choice=True," in on
    assert disable_source(on).new_code == MODEL


# ---- never raises ----------------------------------------------------------------------------


def test_syntax_error_is_a_result_with_the_line():
    broken = MODEL.replace("layer_id=layer_id,", "layer_id=layer_id,,")
    for result in (enable_source(broken), disable_source(broken), inspect_source(broken)):
        assert isinstance(result, Failed)
        assert result.line == 9 and "syntax error" in result.error and result.hint


def test_null_bytes_are_a_result():
    assert isinstance(enable_source("x = 1\0\n"), Failed)


def test_no_call_is_a_result():
    assert isinstance(enable_source("import os\n"), Failed)
    assert isinstance(disable_source("import os\n"), Unchanged)


def test_unimported_topk_is_refused():
    result = enable_source("class M:\n    def __init__(self):\n        self.topk = TopK(top_k=2)\n")
    assert isinstance(result, Failed) and "not imported" in result.error


def test_disable_of_unpatched_file_is_unchanged():
    assert isinstance(disable_source(MODEL), Unchanged)
    assert isinstance(disable_source(MODEL, remove=False), Unchanged)


def test_disable_removes_switch_from_unsupported_calls_too():
    hand = MODEL.replace("layer_id=layer_id,", "layer_id=layer_id,\n            use_expert_choice=flag,")
    assert find_calls(hand)[0].state == State.unsupported
    assert disable_source(hand).new_code == MODEL


# ---- inspection ------------------------------------------------------------------------------


def test_inspection_targets_and_states(monkeypatch):
    source = '''import os
from sglang.srt.layers.moe.topk import TopK
from sglang.srt.layers.moe.expert_choice import TopK  # ecpatch


def build(config):
    return TopK(top_k=2, use_expert_choice=True, expert_capacity_factor=1)


class Layer:
    def __init__(self, config):
        self.mlp.topk = TopK(top_k=2, use_expert_choice=os.environ.get("EC_A", "0") == "1",
                             expert_capacity_factor=1.25)
        self.topk = (TopK(top_k=2, use_expert_choice=False, expert_capacity_factor=3.0) if config else None)
        routers: dict = {}
        routers["a"] = TopK(top_k=2)
        self.grouped: "TopK" = TopK(top_k=2, use_grouped_topk=True)
'''
    found = inspect_source(source)
    assert isinstance(found, Inspection)
    assert found.imports_sglang_topk and found.has_vendored_import and found.imports_os
    rows = [(c.line, c.target, c.state, c.capacity_factor, c.env_var) for c in found.calls]
    assert rows == [
        (7, None, State.on, 1.0, None),
        (12, "self.mlp.topk", State.env, 1.25, "EC_A"),
        (14, "self.topk", State.false, 3.0, None),
        (16, "routers['a']", State.off, None, None),
        (17, "self.grouped", State.unsupported, None, None),
    ]
    monkeypatch.setenv("EC_A", "1")
    assert env_value("EC_A") is True
    monkeypatch.setenv("EC_A", "true")  # only "1" switches it on, like the patched expression
    assert env_value("EC_A") is False


def test_own_os_import_marker_does_not_count_as_the_files_import():
    patched = enable_source(MODEL).new_code
    assert "import os  # ecpatch" in patched
    assert inspect_source(patched).imports_os is False


# ---- files -----------------------------------------------------------------------------------


def test_not_utf8_is_reported(tmp_path):
    path = tmp_path / "latin1.py"
    path.write_bytes(MODEL.replace("Block", "Bl\xf6ck").encode("latin-1"))
    loaded = files.load_model_file(path, explicit=True)
    assert isinstance(loaded, Failed) and "not UTF-8" in loaded.error and loaded.hint


def test_bom_is_kept(tmp_path):
    path = tmp_path / "bom.py"
    path.write_bytes(b"\xef\xbb\xbf" + MODEL.encode())
    source = files.read_source(path)
    assert source.bom and not source.text.startswith("\ufeff")
    assert source.encode(source.text) == path.read_bytes()


def test_write_atomic_keeps_mode_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    os.chmod(path, 0o640)
    files.write_atomic(path, b"x = 1\n")
    assert path.read_bytes() == b"x = 1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["model.py"]


def test_write_atomic_writes_through_a_symlink(tmp_path):
    target = tmp_path / "real.py"
    target.write_text(MODEL)
    link = tmp_path / "link.py"
    link.symlink_to(target)
    files.write_atomic(link, b"y = 2\n")
    assert link.is_symlink() and target.read_bytes() == b"y = 2\n"


def test_collect_folder_skips_non_models_and_reports_bad_files(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "a.py").write_text(MODEL)
    (models / "sub" / "b.py").write_text(MODEL)
    (models / "plain.py").write_text("x = 1\n")
    (models / "defines.py").write_text("class TopK:\n    pass\nx = TopK()\n")
    (models / "broken.py").write_text(MODEL + "def (:\n")
    (models / ".hidden").mkdir()
    (models / ".hidden" / "c.py").write_text(MODEL)
    found, errors, texts = files.collect([models])
    assert sorted(f.path.relative_to(models).as_posix() for f in found) == ["a.py", "sub/b.py"]
    assert [(e.path.name, "syntax error" in e.failure.error) for e in errors] == [("broken.py", True)]
    assert models / "plain.py" in texts


def test_collect_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("TopK(")
    found, errors, _ = files.collect([tmp_path / "missing.py", tmp_path / "empty", tmp_path / "notes.txt"])
    assert not found
    assert [e.failure.error for e in errors] == [
        "no such file or directory",
        "no SGLang model file calling TopK(...) under this folder",
        "not a Python file (.py)",
    ]


def test_collect_narrows_a_checkout_to_its_package(tmp_path):
    package = tmp_path / "repo" / "python" / "sglang"
    (package / "srt" / "models").mkdir(parents=True)
    (package / "srt" / "models" / "m.py").write_text(MODEL)
    (tmp_path / "repo" / "test").mkdir()
    (tmp_path / "repo" / "test" / "test_m.py").write_text(MODEL)  # outside the package: not a target
    assert files.search_root(tmp_path / "repo") == package
    found, errors, _ = files.collect([tmp_path / "repo"])
    assert [f.path.name for f in found] == ["m.py"] and not errors


def test_importers_finds_absolute_and_relative_imports(tmp_path):
    root = tmp_path / "sglang"
    models = root / "srt" / "models"
    models.mkdir(parents=True)
    (models / "qwen2_moe.py").write_text(MODEL)
    candidates = {
        models / "qwen3_next.py": b"from sglang.srt.models.qwen2_moe import Qwen2MoeSparseMoeBlock\n",
        models / "rel.py": b"from .qwen2_moe import X as Y, Z  # note\n",
        models / "multi.py": b"from sglang.srt.models.qwen2_moe import (\n    A,  # a\n    B,\n)\n",
        models / "whole.py": b"import sglang.srt.models.qwen2_moe\n",
        models / "other.py": b"from sglang.srt.models.qwen2_moe_extra import Y\n# qwen2_moe\n",
        models / "qwen2_moe.py": MODEL.encode(),
    }
    found = files.importers(models / "qwen2_moe.py", candidates, root)
    assert [(p.name, names) for p, names in found] == [
        ("multi.py", ("A", "B")), ("qwen3_next.py", ("Qwen2MoeSparseMoeBlock",)), ("rel.py", ("X", "Z")),
        ("whole.py", ("*",))]


def test_diff_marks_a_missing_final_newline():
    diff = files.unified_diff("a\nb", "a\nc", Path("m.py"))
    assert diff.endswith("-b\n\\ No newline at end of file\n+c\n\\ No newline at end of file\n")
    assert diff.startswith("--- a/m.py\n+++ b/m.py\n")
