"""File plumbing around the pure core: finding model files, reading, diffing, writing.

Everything here returns problems as `Failed` values tied to a path (no exceptions for a bad
file), so the CLI can report every file of a batch and keep going.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from .calls import inspect_source
from .model import MARKER, VENDORED_MODULE, Failed, Inspection

BOM = "\ufeff"
CALL_TEXT = b"TopK("
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "build", "dist"}
# ecpatch's own vendored copy inside an SGLang tree defines a TopK class; never a target.
_VENDORED_DIR = ("layers", "moe", "expert_choice")
VENDORED_LINE_TEXT = f"from {VENDORED_MODULE} import TopK  {MARKER}"


@dataclass(frozen=True)
class Source:
    """A decoded Python file. `text` has no BOM; `bom` says whether to write one back."""

    path: Path
    text: str
    bom: bool = False

    def encode(self, text: str) -> bytes:
        return ((BOM if self.bom else "") + text).encode("utf-8")


@dataclass(frozen=True)
class ModelFile:
    """A file that calls ``TopK(...)``, with what `inspect_source` learnt about it."""

    source: Source
    inspection: Inspection

    @property
    def path(self) -> Path:
        return self.source.path


@dataclass(frozen=True)
class PathError:
    """A PATH argument or a file that cannot be used, with the cause and a hint."""

    path: Path
    failure: Failed


def read_bytes(path: Path) -> Union[bytes, Failed]:
    """The bytes of `path`, or why they cannot be read. Never raises."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return Failed(f"cannot read: {exc.strerror or exc}", hint="check the path and its permissions")


def read_source(path: Path) -> Union[Source, Failed]:
    """Read `path` as UTF-8 text, keeping its line endings. Never raises."""
    data = read_bytes(path)
    return data if isinstance(data, Failed) else decode_source(path, data)


def decode_source(path: Path, data: bytes) -> Union[Source, Failed]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Failed(f"not UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r})",
                      hint="ecpatch only edits UTF-8 files; re-save the file as UTF-8")
    bom = text.startswith(BOM)
    return Source(path=path, text=text[1:] if bom else text, bom=bom)


def search_root(folder: Path) -> Path:
    """Where to look for model files under `folder`.

    An SGLang checkout (``python/sglang``) or a site-packages folder (``sglang/``) narrows to
    the package; any other folder is searched as it is.
    """
    for candidate in (folder / "python" / "sglang", folder / "sglang"):
        if (candidate / "srt").is_dir():
            return candidate
    return folder


def iter_python_files(folder: Path) -> Iterator[Path]:
    """Every ``*.py`` under `folder`, sorted, skipping hidden, cache and vendored folders."""
    for dirpath, dirnames, filenames in os.walk(folder):
        parts = Path(dirpath).parts
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and d not in _SKIP_DIRS
            and tuple(parts[-2:]) + (d,) != _VENDORED_DIR)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def load_model_file(path: Path, data: Optional[bytes] = None, *, explicit: bool) -> Union[ModelFile, Failed, None]:
    """Inspect one file. None: not a model file (silently skipped when found in a folder)."""
    if data is None:
        data = read_bytes(path)
        if isinstance(data, Failed):
            return data
    if CALL_TEXT not in data:
        if explicit:
            return Failed("no TopK(...) call in this file",
                          hint="point ecpatch at an SGLang MoE model file, or a folder of them")
        return None
    source = decode_source(path, data)
    if isinstance(source, Failed):
        return source
    inspection = inspect_source(source.text, str(path))
    if isinstance(inspection, Failed):
        return inspection
    if not inspection.is_model_file:
        if explicit:
            why = ("no TopK(...) call in this file" if not inspection.calls
                   else "TopK is not imported from sglang.srt.layers.moe.topk")
            return Failed(why, hint="ecpatch patches SGLang model files that call SGLang's TopK")
        return None
    return ModelFile(source=source, inspection=inspection)


def collect(paths: Iterable[Path]) -> tuple[list[ModelFile], list[PathError], dict[Path, bytes]]:
    """Resolve PATH arguments into model files.

    Returns the model files (deduplicated, in order), the errors (missing paths, unreadable
    or unparsable files, folders without model files), and the raw bytes of every file that
    was read (status reuses them to find which sibling files import a patched module).
    """
    found: list[ModelFile] = []
    errors: list[PathError] = []
    texts: dict[Path, bytes] = {}
    seen: set[Path] = set()
    for path in paths:
        if not path.exists():
            errors.append(PathError(path, Failed("no such file or directory",
                                                 hint="check the spelling of the path")))
            continue
        if path.is_file():
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            if path.suffix != ".py":
                errors.append(PathError(path, Failed("not a Python file (.py)",
                                                     hint="pass a model file, a folder, or an SGLang root")))
                continue
            loaded = load_model_file(path, explicit=True)
            _add(path, loaded, found, errors)
            continue
        root = search_root(path)
        before = len(found), len(errors)
        for file in iter_python_files(root):
            key = file.resolve()
            if key in seen:
                continue
            seen.add(key)
            data = read_bytes(file)
            if isinstance(data, Failed):
                errors.append(PathError(file, data))
                continue
            texts[file] = data
            _add(file, load_model_file(file, data, explicit=False), found, errors)
        if (len(found), len(errors)) == before:
            errors.append(PathError(path, Failed(
                "no SGLang model file calling TopK(...) under this folder",
                hint="pass an SGLang model file, a models folder (sglang/srt/models) or an SGLang root")))
    return found, errors, texts


def _add(path: Path, loaded, found: list, errors: list) -> None:
    if isinstance(loaded, ModelFile):
        found.append(loaded)
    elif isinstance(loaded, Failed):
        errors.append(PathError(path, loaded))


def display_path(path: Path, cwd: Optional[Path] = None) -> str:
    """`path` relative to the working directory when it lies below it, else as given."""
    cwd = cwd or Path.cwd()
    try:
        return path.resolve().relative_to(cwd.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def unified_diff(old: str, new: str, path: Path) -> str:
    """A unified diff with ``a/`` and ``b/`` headers that ``git apply`` accepts."""
    name = display_path(path).lstrip("/")
    lines = list(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                      fromfile=f"a/{name}", tofile=f"b/{name}", n=3))
    out = []
    for line in lines:
        if line.endswith("\n"):
            out.append(line)
        else:  # the file's last line has no newline
            out.append(line + "\n\\ No newline at end of file\n")
    return "".join(out)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step (temp file in the same folder + rename),
    keeping the file's permission bits. A symlink is written through (its target changes,
    the link stays). Raises OSError (the CLI reports it per file)."""
    path = Path(os.path.realpath(path))
    mode = stat.S_IMODE(path.stat().st_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".ecpatch-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def importers(path: Path, candidates: dict[Path, bytes],
              sglang_root: Optional[Path]) -> list[tuple[Path, tuple[str, ...]]]:
    """Other files among `candidates` that import from the module of `path`, with the names.

    E.g. qwen3_next.py imports ``Qwen2MoeSparseMoeBlock`` from qwen2_moe.py, so patching
    qwen2_moe.py changes Qwen3-Next too (whereas a file importing only a helper such as
    ``ReplicatedLinear`` is not affected: the names let the reader tell). Matches
    ``from <module> import ...`` with the module written absolutely (from the SGLang root)
    or relatively (``.qwen2_moe``), and ``import <module>`` (names: ``*``).
    """
    stem = path.stem
    if stem == "__init__":
        return []
    if sglang_root is not None:
        try:
            rel = path.resolve().relative_to(sglang_root.resolve().parent).with_suffix("")
            absolute = re.escape(".".join(rel.parts))
        except ValueError:
            absolute = re.escape(f"{path.parent.name}.{stem}")
    else:
        absolute = r"[\w.]*\b" + re.escape(f"{path.parent.name}.{stem}")
    pattern = re.compile(
        rf"^[ \t]*(?:from[ \t]+(?:{absolute}|\.+(?:[\w.]*\.)?{re.escape(stem)})[ \t]+import[ \t]*"
        rf"(?:\((?P<group>[^)]*)\)|(?P<line>[^\n#]*))|import[ \t]+{absolute}\b)".encode(), re.M)
    needle = stem.encode()
    me = path.resolve()
    found = []
    for other, data in sorted(candidates.items()):
        if needle not in data or other.resolve() == me:
            continue
        names: list[str] = []
        for match in pattern.finditer(data):
            listed = (match.group("group") or match.group("line") or b"*").decode("utf-8", "replace")
            for item in re.sub(r"#[^\n]*", "", listed).replace("\\", " ").split(","):
                name = item.split(" as ")[0].strip()
                if name and name not in names:
                    names.append(name)
        if names:
            found.append((other, tuple(names)))
    return found


def sibling_candidates(path: Path, sglang_root: Optional[Path],
                       known: Optional[dict[Path, bytes]] = None) -> dict[Path, bytes]:
    """The files to search for importers of `path`: the models folder (or `path`'s folder).

    `known` holds bytes already read (by `collect`); those files are not read again."""
    known = known or {}
    folder = path.parent
    if sglang_root is not None:
        models = sglang_root / "srt" / "models"
        if models.is_dir() and models.resolve() in path.resolve().parents:
            folder = models
    out: dict[Path, bytes] = {}
    for file in iter_python_files(folder):
        if file in known:
            out[file] = known[file]
            continue
        try:
            out[file] = file.read_bytes()
        except OSError:
            continue
    return out


def marker_remains(root: Path, ignore: Iterable[Path] = ()) -> bool:
    """True when a ``.py`` file under `root` (other than `ignore`) has ecpatch's import line."""
    skip = {p.resolve() for p in ignore}
    needle = VENDORED_LINE_TEXT.encode()
    for file in iter_python_files(root):
        if file.resolve() in skip:
            continue
        try:
            if needle in file.read_bytes():
                return True
        except OSError:
            continue
    return False
