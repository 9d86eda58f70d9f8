"""The vendored package: contents, stamp, status fields, updates, atomic writes, removal."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sgl_ecpatch import __version__, vendor

TESTS = Path(__file__).resolve().parent.parent
RUNTIME = Path(vendor.__file__).resolve().parent / "runtime"


@pytest.fixture
def tree(tmp_path) -> Path:
    """The smallest SGLang-shaped tree: ``sglang/srt/layers/moe/topk.py`` and package inits."""
    root = tmp_path / "sglang"
    moe = root / "srt" / "layers" / "moe"
    moe.mkdir(parents=True)
    for package in (root, root / "srt", root / "srt" / "layers", moe):
        (package / "__init__.py").write_text("")
    (moe / "topk.py").write_text("# SGLang's TopK would live here\n")
    (root / "srt" / "models").mkdir()
    (root / "srt" / "models" / "qwen2_moe.py").write_text("x = 1\n")
    return root


def manifest(root: Path) -> dict:
    """path -> sha256 of every file, ``__pycache__`` directories excluded (see vendor's docstring)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
    }


def test_install_writes_runtime_layer_and_stamp(tree):
    message = vendor.install(tree, min_tokens=None, layers=None)
    assert "installed" in message
    directory = vendor.vendored_dir(tree)
    names = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    runtime_sources = {p.relative_to(RUNTIME).as_posix() for p in RUNTIME.rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".cu", ".cuh", ".cpp", ".h")}
    assert runtime_sources <= names
    assert {"topk_layer.py", "ecpatch_stamp.json", "kernel/expert_choice.cu"} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    # The runtime's own __init__ comes first, verbatim; the footer adds TopK.
    init = (directory / "__init__.py").read_bytes()
    assert init.startswith((RUNTIME / "__init__.py").read_bytes())
    assert b'if name == "TopK"' in init
    stamp = json.loads((directory / "ecpatch_stamp.json").read_text())
    assert stamp["version"] == __version__
    assert stamp["content_hash"] == vendor.content_hash(vendor.package_files())
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".expert_choice")]  # no staging left


def test_vendored_info_reports_current_outdated_and_edited(tree):
    assert vendor.vendored_info(tree) is None
    vendor.install(tree, min_tokens=64, layers="0-3, 7")
    info = vendor.vendored_info(tree)
    assert info.up_to_date and info.intact and info.state == "current"
    assert (info.version, info.min_tokens, info.layers) == (__version__, 64, "0-3,7")

    stamp_path = vendor.vendored_dir(tree) / "ecpatch_stamp.json"
    stamp = json.loads(stamp_path.read_text())
    stamp["version"] = "0.0.1"
    stamp_path.write_text(json.dumps(stamp))
    old = vendor.vendored_info(tree)
    assert not old.up_to_date and "0.0.1" in old.state and "ecpatch enable" in old.state

    assert "updated" in vendor.install(tree)  # enable again updates; settings are kept
    again = vendor.vendored_info(tree)
    assert again.up_to_date and (again.min_tokens, again.layers) == (64, "0-3,7")

    (vendor.vendored_dir(tree) / "fast.py").write_text("# edited\n")
    edited = vendor.vendored_info(tree)
    assert not edited.intact and not edited.up_to_date and "edited" in edited.state


def test_install_is_idempotent_and_settings_can_be_cleared(tree):
    vendor.install(tree, min_tokens=8, layers="1-2")
    assert "up to date" in vendor.install(tree)
    assert "up to date" in vendor.install(tree, min_tokens=8)
    vendor.install(tree, min_tokens=0, layers="all")
    info = vendor.vendored_info(tree)
    assert (info.min_tokens, info.layers) == (0, None)


@pytest.mark.parametrize("settings, needle", [
    (dict(min_tokens=-1), "--min-tokens"),
    (dict(min_tokens="many"), "--min-tokens"),
    (dict(layers="5-2"), "--layers"),
    (dict(layers="1,,2"), "--layers"),
])
def test_bad_settings_raise_naming_the_option(tree, settings, needle):
    with pytest.raises(ValueError, match=needle):
        vendor.install(tree, **settings)
    assert not vendor.vendored_dir(tree).exists()


def test_dry_run_writes_nothing(tree):
    before = manifest(tree)
    assert vendor.install(tree, dry_run=True).startswith("would install")
    assert manifest(tree) == before
    vendor.install(tree)
    assert vendor.remove(tree, dry_run=True) is True
    assert vendor.vendored_dir(tree).is_dir()


def test_remove_restores_the_tree_byte_for_byte(tree):
    before = manifest(tree)
    vendor.install(tree, min_tokens=4, layers="0")
    (vendor.vendored_dir(tree) / "__pycache__").mkdir()  # what an import of the package leaves
    (vendor.vendored_dir(tree) / "__pycache__" / "fast.cpython-311.pyc").write_bytes(b"\0")
    assert vendor.remove(tree) is True
    assert manifest(tree) == before
    assert not vendor.vendored_dir(tree).exists()
    assert vendor.remove(tree) is False


def test_a_directory_ecpatch_did_not_write_is_left_alone(tree):
    foreign = vendor.vendored_dir(tree)
    foreign.mkdir()
    (foreign / "__init__.py").write_text("# someone else's\n")
    assert vendor.vendored_info(tree) is None
    assert vendor.remove(tree) is False
    with pytest.raises(ValueError, match="not written by ecpatch"):
        vendor.install(tree)
    assert (foreign / "__init__.py").read_text() == "# someone else's\n"


def test_find_sglang_root(tree):
    model = tree / "srt" / "models" / "qwen2_moe.py"
    assert vendor.find_sglang_root(model) == tree
    assert vendor.find_sglang_root(tree.parent) is None


def test_package_imports_without_sglang_and_exports_topk_lazily(tree):
    """Importing the routing does not import SGLang's TopK module; `TopK` is loaded on first use."""
    vendor.install(tree)
    code = textwrap.dedent("""
        import sys, torch
        import sglang.srt.layers.moe.expert_choice as ec
        weights, ids = ec.expert_choice_topk(torch.randn(5, 8), 2, impl="torch")
        assert ids.shape == (5, 2)
        assert "sglang.srt.layers.moe.topk" not in sys.modules
        try:
            ec.TopK
        except (ImportError, AttributeError) as exc:
            print("lazy:", type(exc).__name__)
        assert "sglang.srt.layers.moe.topk" in sys.modules
    """)
    env = dict(os.environ, PYTHONPATH=str(tree.parent), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree.parent)
    assert proc.returncode == 0, proc.stderr
    assert "lazy:" in proc.stdout  # the stand-in topk.py has no TopK class to subclass


@pytest.mark.network
def test_enable_import_disable_remove_on_real_sglang_is_byte_identical(tmp_path):
    """enable -> import in SGLang (bytecode written) -> disable --remove: every file as before.

    Python's own ``__pycache__`` next to SGLang's modules is not compared (see vendor's
    docstring); our package, its cache included, must be gone entirely.
    """
    sys.path.insert(0, str(TESTS))
    import sglang_env

    root = sglang_env.copy_sglang(tmp_path)
    before = manifest(root)
    model = root / "srt" / "models" / "qwen2_moe.py"
    run = lambda *args: subprocess.run([sys.executable, "-m", "sgl_ecpatch", *args],  # noqa: E731
                                       capture_output=True, text=True)
    assert run("enable", "--min-tokens", "16", "--layers", "0-7", str(model)).returncode == 0
    assert vendor.vendored_info(root).min_tokens == 16
    proc = sglang_env.run_python("""
        import os
        os.environ["SGLANG_EXPERT_CHOICE"] = "1"
        import sglang.srt.models.qwen2_moe as m
        topk = m.TopK(top_k=4, renormalize=False, layer_id=3, use_expert_choice=True)
        assert topk.expert_choice_settings.min_tokens == 16 and topk.expert_choice_layer
        print("built", type(topk).__module__)
    """, sglang_parent=tmp_path, env={"PYTHONDONTWRITEBYTECODE": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (vendor.vendored_dir(root) / "__pycache__").is_dir()  # the import did write bytecode
    assert run("disable", "--remove", str(model)).returncode == 0
    assert not vendor.vendored_dir(root).exists()
    assert manifest(root) == before


MODEL = '''from sglang.srt.layers.moe.topk import TopK


class Block:
    def __init__(self, config, layer_id):
        self.topk = TopK(top_k=config.num_experts_per_tok, renormalize=True, layer_id=layer_id)
'''


def test_status_says_when_the_vendored_package_is_older_and_enable_updates_it(tree):
    model = tree / "srt" / "models" / "tiny_moe.py"
    model.write_text(MODEL)
    run = lambda *args: subprocess.run([sys.executable, "-m", "sgl_ecpatch", *args],  # noqa: E731
                                       capture_output=True, text=True)
    assert run("enable", "--min-tokens", "8", str(model)).returncode == 0
    shown = run("status", str(model))
    assert "up_to_date=True" in shown.stdout and "min_tokens=8" in shown.stdout, shown.stdout

    stamp_path = vendor.vendored_dir(tree) / "ecpatch_stamp.json"
    stamp = json.loads(stamp_path.read_text())
    stamp["version"] = "0.0.1"
    stamp_path.write_text(json.dumps(stamp))
    shown = run("status", str(model))
    assert "up_to_date=False" in shown.stdout and "written by ecpatch 0.0.1" in shown.stdout, shown.stdout



def test_enable_again_on_a_patched_file_updates_an_older_vendored_package(tree):
    model = tree / "srt" / "models" / "tiny_moe.py"
    model.write_text(MODEL)
    run = lambda *args: subprocess.run([sys.executable, "-m", "sgl_ecpatch", *args],  # noqa: E731
                                       capture_output=True, text=True)
    assert run("enable", "--min-tokens", "8", str(model)).returncode == 0
    stamp_path = vendor.vendored_dir(tree) / "ecpatch_stamp.json"
    stamp = json.loads(stamp_path.read_text())
    stamp["version"] = "0.0.1"
    stamp_path.write_text(json.dumps(stamp))
    assert run("enable", str(model)).returncode == 0  # the file is patched already; the package is updated
    info = vendor.vendored_info(tree)
    assert info.up_to_date and info.version == __version__ and info.min_tokens == 8
