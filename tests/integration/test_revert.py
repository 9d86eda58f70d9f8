"""`ecpatch revert` on a git repository made from the SGLang 0.5.23 wheel's files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import git
import pytest

pytestmark = pytest.mark.network

VENDORED = Path("sglang", "srt", "layers", "moe", "expert_choice")
QWEN2 = Path("sglang", "srt", "models", "qwen2_moe.py")


def ecpatch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgl_ecpatch", *args], capture_output=True, text=True, cwd=cwd)


def status(repo: git.Repo) -> str:
    return repo.git.status("--porcelain", "--untracked-files=all")


@pytest.fixture(scope="module")
def wheel_repo(sglang_wheel, tmp_path_factory) -> Path:
    """A git repository whose one commit holds the wheel's ``sglang`` package."""
    origin = tmp_path_factory.mktemp("wheel-repo")
    shutil.copytree(sglang_wheel("0.5.23"), origin / "sglang", ignore=shutil.ignore_patterns("__pycache__"))
    repo = git.Repo.init(origin)
    repo.git.add("-A")
    repo.git.commit("-q", "-m", "sglang 0.5.23 wheel", env={
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"})
    return origin


@pytest.fixture
def repo(wheel_repo, tmp_path) -> git.Repo:
    """A fresh clone of `wheel_repo` (objects hard-linked, so it is quick)."""
    return git.Repo.clone_from(str(wheel_repo), tmp_path / "clone")


def test_enable_over_models_then_revert_leaves_git_status_clean(repo):
    work = Path(repo.working_tree_dir)
    enabled = ecpatch("enable", "sglang/srt/models", cwd=work)
    assert enabled.returncode == 0, enabled.stderr
    changed = [line for line in status(repo).splitlines()]
    assert any(line.endswith("qwen2_moe.py") for line in changed), changed
    assert any("expert_choice" in line for line in changed), changed  # the untracked vendored package

    dry = ecpatch("revert", "--dry-run", "sglang/srt/models", cwd=work)
    assert dry.returncode == 0, dry.stderr
    assert "would restore" in dry.stderr and "would remove the vendored" in dry.stderr
    assert status(repo).splitlines() == changed  # --dry-run changed nothing

    reverted = ecpatch("revert", "sglang/srt/models", cwd=work)
    assert reverted.returncode == 0, reverted.stderr
    assert status(repo) == ""
    assert not (work / VENDORED).exists()


def test_revert_refuses_hand_edited_file_and_shows_the_diff(repo):
    work = Path(repo.working_tree_dir)
    assert ecpatch("enable", str(QWEN2), cwd=work).returncode == 0
    model = work / QWEN2
    patched = model.read_text()
    edited = patched.replace("class Qwen2MoeSparseMoeBlock", "# tuned by hand\nclass Qwen2MoeSparseMoeBlock", 1)
    assert edited != patched
    model.write_text(edited)

    refused = ecpatch("revert", str(QWEN2), cwd=work)
    assert refused.returncode == 1, refused.stderr
    assert "+# tuned by hand" in refused.stdout  # the diff of the changes beyond ecpatch's own
    assert "use_expert_choice" not in refused.stdout  # ...and only those
    assert "--force" in refused.stderr
    assert model.read_text() == edited
    assert (work / VENDORED).is_dir()  # the file still imports it

    forced = ecpatch("revert", "--force", str(QWEN2), cwd=work)
    assert forced.returncode == 0, forced.stderr
    assert status(repo) == ""


def test_revert_keeps_vendored_package_while_another_file_uses_it(repo):
    work = Path(repo.working_tree_dir)
    qwen3 = Path("sglang", "srt", "models", "qwen3_moe.py")
    assert ecpatch("enable", str(QWEN2), str(qwen3), cwd=work).returncode == 0
    first = ecpatch("revert", str(QWEN2), cwd=work)
    assert first.returncode == 0, first.stderr
    assert (work / VENDORED).is_dir()
    left = status(repo).splitlines()
    assert any(line.endswith("qwen3_moe.py") for line in left) and not any("qwen2_moe" in line for line in left)
    second = ecpatch("revert", str(qwen3), cwd=work)
    assert second.returncode == 0, second.stderr
    assert status(repo) == ""


def test_revert_outside_git_points_to_disable_remove(sglang_wheel, tmp_path):
    shutil.copytree(sglang_wheel("0.5.23") / "srt" / "models", tmp_path / "models")
    result = ecpatch("revert", str(tmp_path / "models"), cwd=tmp_path)
    assert result.returncode == 2
    assert "not inside a git repository" in result.stderr
    assert "ecpatch disable --remove" in result.stderr
