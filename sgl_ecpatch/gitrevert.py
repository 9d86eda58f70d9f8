"""`ecpatch revert`: put files that ecpatch changed back to their committed state, with git.

For each ``.py`` file under the given paths that carries ecpatch's marker
(``# ecpatch``) and differs from ``HEAD``, the working file is first cleaned with the
patch engine's own ``disable_source(..., remove=True)`` (a pure function). When the
result is exactly the ``HEAD`` content, every difference from ``HEAD`` is ecpatch's own,
and the file is restored with ``git checkout HEAD -- FILE``. Otherwise the file holds
other changes too: it is refused, and the diff of those other changes (``HEAD`` against
the cleaned file) is shown, unless ``force``.

After the files, the vendored package of each SGLang tree involved is removed when no
file of that tree imports it any more and git does not track it (a tracked one belongs
to the repository and is left as it is).

`plan_revert` only reads; `apply_revert` writes. The CLI (`sgl_ecpatch.commands.revert`)
prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

from sgl_ecpatch import vendor
from sgl_ecpatch.patcher.files import decode_source, iter_python_files, marker_remains, unified_diff
from sgl_ecpatch.patcher.model import MARKER, Changed, Failed


class NotAGitRepository(Exception):
    """A path is not inside a git work tree."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: not inside a git repository")
        self.path = path


@dataclass(frozen=True)
class FileRevert:
    """One marked file: ``extra_diff`` is empty when all its changes are ecpatch's own."""

    path: Path
    relpath: str
    extra_diff: str = ""
    note: Optional[str] = None  # why it cannot be checked (then it counts as having other changes)

    @property
    def only_ecpatch(self) -> bool:
        return not self.extra_diff and self.note is None


@dataclass
class RevertPlan:
    """What `apply_revert` will do for one repository."""

    repo_root: Path
    restore: List[FileRevert] = field(default_factory=list)   # will be checked out from HEAD
    refused: List[FileRevert] = field(default_factory=list)   # other changes; needs --force
    untracked: List[Path] = field(default_factory=list)       # marked, but git has no HEAD version
    unchanged: List[Path] = field(default_factory=list)       # marked, and HEAD has it so (committed)
    sglang_roots: List[Path] = field(default_factory=list)


def _open_repo(path: Path):
    import git

    try:
        repo = git.Repo(path if path.is_dir() else path.parent, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise NotAGitRepository(path) from None
    if repo.bare:
        raise NotAGitRepository(path)
    return repo


def _marked_files(path: Path) -> Iterable[Path]:
    if path.is_file():
        candidates: Iterable[Path] = [path]
    else:
        candidates = iter_python_files(path)
    for file in candidates:
        try:
            if MARKER.encode() in file.read_bytes():
                yield file
        except OSError:
            continue


def _head_bytes(repo, relpath: str) -> Optional[bytes]:
    try:
        if not repo.head.is_valid():
            return None
        blob = repo.head.commit.tree / relpath
    except KeyError:
        return None
    return blob.data_stream.read()


def _without_ecpatch(path: Path, data: bytes):
    """(cleaned bytes, cleaned text, None) or (None, None, why it cannot be cleaned)."""
    from sgl_ecpatch.patcher import disable_source

    source = decode_source(path, data)
    if isinstance(source, Failed):
        return None, None, source.error
    result = disable_source(source.text, remove=True, filename=str(path))
    if isinstance(result, Failed):
        return None, None, result.error
    text = result.new_code if isinstance(result, Changed) else source.text
    return source.encode(text), text, None


def plan_revert(paths: Iterable[Path], *, force: bool = False) -> List[RevertPlan]:
    """One plan per repository holding `paths`; raises NotAGitRepository for a path outside git."""
    plans: dict = {}
    for raw in paths:
        path = Path(raw).resolve()
        if not path.exists():
            raise FileNotFoundError(f"{raw}: no such file or directory")
        repo = _open_repo(path)
        root = Path(repo.working_tree_dir).resolve()
        plan = plans.get(root)
        if plan is None:
            plan = plans[root] = RevertPlan(repo_root=root)
            plan._repo = repo  # type: ignore[attr-defined]
        seen = {f.path for f in plan.restore + plan.refused} | set(plan.untracked) | set(plan.unchanged)
        sglang_root = vendor.find_sglang_root(path)
        if sglang_root is not None and sglang_root not in plan.sglang_roots:
            plan.sglang_roots.append(sglang_root)
        for file in _marked_files(path):
            file = file.resolve()
            if file in seen:
                continue
            seen.add(file)
            relpath = file.relative_to(root).as_posix()
            head = _head_bytes(repo, relpath)
            work = file.read_bytes()
            if head is None:
                plan.untracked.append(file)
                continue
            if head == work:
                plan.unchanged.append(file)
                continue
            tree = vendor.find_sglang_root(file)
            if tree is not None and tree not in plan.sglang_roots:
                plan.sglang_roots.append(tree)
            cleaned, cleaned_text, why = _without_ecpatch(file, work)
            if why is not None:
                entry = FileRevert(file, relpath, note=f"ecpatch's changes cannot be taken out ({why})")
            elif cleaned == head:
                entry = FileRevert(file, relpath)
            else:
                head_text = head.decode("utf-8", errors="replace")
                entry = FileRevert(file, relpath, extra_diff=unified_diff(head_text, cleaned_text, file))
            (plan.restore if entry.only_ecpatch or force else plan.refused).append(entry)
    return list(plans.values())


def _vendored_tracked(repo, root: Path, repo_root: Path) -> bool:
    directory = vendor.vendored_dir(root)
    try:
        relative = directory.resolve().relative_to(repo_root).as_posix()
    except ValueError:
        return False
    return bool(repo.git.ls_files("--", relative).strip())


def vendored_to_remove(plan: RevertPlan) -> List[Path]:
    """SGLang trees whose vendored package goes once `plan.restore` is restored."""
    repo = plan._repo  # type: ignore[attr-defined]
    restored = [entry.path for entry in plan.restore]
    trees = []
    for root in plan.sglang_roots:
        if vendor.vendored_info(root) is None or _vendored_tracked(repo, root, plan.repo_root):
            continue
        if marker_remains(root, ignore=restored):
            continue
        trees.append(root)
    return trees


def apply_revert(plan: RevertPlan) -> List[Path]:
    """Restore `plan.restore` from HEAD and remove vendored packages; return the trees cleaned."""
    repo = plan._repo  # type: ignore[attr-defined]
    trees = vendored_to_remove(plan)
    if plan.restore:
        repo.git.checkout("HEAD", "--", *[entry.relpath for entry in plan.restore])
    for root in trees:
        vendor.remove(root, dry_run=False)
    return trees
