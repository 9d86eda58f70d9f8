"""Install, inspect and remove the vendored expert-choice package in an SGLang tree.

`ecpatch enable` rewrites model files so that they import
``sglang.srt.layers.moe.expert_choice.TopK``; this module puts that package into the
SGLang tree the model files belong to, as ``<root>/srt/layers/moe/expert_choice/``:

* every ``.py`` file and kernel source of ``sgl_ecpatch/runtime/`` (relative imports
  only, so it works under any package name), with ``__init__.py`` extended by
  ``templates/init_footer.py`` so that ``from ... import TopK`` works;
* ``topk_layer.py`` from ``templates/``: the TopK subclass the model files use;
* ``ecpatch_stamp.json``: the ecpatch version, a content hash of the vendored files and
  the settings given to ``enable`` (``min_tokens``, ``layers``). `vendored_info` reads it
  back and compares it with this ecpatch (``up_to_date``), and with the files on disk
  (``intact``).

SGLang's own files are never touched. The package is written beside its final place
and renamed into it, so a reader (a starting server) never sees half a package.
`remove` deletes exactly that directory, ``__pycache__`` included.

What "byte-identical after remove" means: every file the tree had before `install`
has the same bytes afterwards, and no file or directory of ours is left. Importing
Python modules writes ``__pycache__/*.pyc`` next to *SGLang's own* modules (and the
patched model file); that is Python's bytecode cache, not ours, and is regenerated from
the sources, so comparisons of a tree that was imported ignore ``__pycache__``
directories (a pip-installed tree ships its own .pyc files, which Python re-validates
against the restored sources). Inside our package the cache goes with the package.

Contract used by the CLI (sgl_ecpatch.cli):
    find_sglang_root(path: Path) -> Path | None
        The `sglang` package directory that holds `path` (has srt/layers/moe/topk.py).
    vendored_info(root: Path) -> VendoredInfo | None
    install(root: Path, *, min_tokens: int | None, layers: str | None, dry_run: bool) -> str
        Writes <root>/srt/layers/moe/expert_choice/ ; returns a one-line description.
        Bad settings raise ValueError naming the setting.
    remove(root: Path, *, dry_run: bool) -> bool
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from sgl_ecpatch import __version__

VENDORED_PACKAGE = "sglang.srt.layers.moe.expert_choice"
VENDORED_DIR = Path("srt", "layers", "moe", "expert_choice")
STAMP_NAME = "ecpatch_stamp.json"
LAYER_MODULE = "topk_layer.py"
INIT_FOOTER = "init_footer.py"
KERNEL_SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
STAMP_TOOL = "sgl-ecpatch"

_PACKAGE_DIR = Path(__file__).resolve().parent


def find_sglang_root(path: Path) -> Optional[Path]:
    """The ``sglang`` package directory that holds `path` (it has srt/layers/moe/topk.py)."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.name == "sglang" and (parent / "srt" / "layers" / "moe" / "topk.py").is_file():
            return parent
    return None


def vendored_dir(root: Path) -> Path:
    """Where the vendored package lives in the SGLang tree `root`."""
    return Path(root) / VENDORED_DIR


# ---------------------------------------------------------------------------- contents


def _templates_dir() -> Path:
    """templates/ of the repository (editable install) or sgl_ecpatch/_templates (wheel)."""
    candidates = [_PACKAGE_DIR / "_templates", _PACKAGE_DIR.parent / "templates"]
    try:
        import sgl_ecpatch._templates as templates_package

        candidates.insert(0, Path(templates_package.__file__).resolve().parent)
    except ImportError:
        pass
    for candidate in candidates:
        if (candidate / LAYER_MODULE).is_file():
            return candidate
    raise FileNotFoundError(f"ecpatch's templates ({LAYER_MODULE}) are missing from this installation")


def _runtime_dir() -> Path:
    return _PACKAGE_DIR / "runtime"


def package_files() -> Dict[str, bytes]:
    """The files `install` writes (relative POSIX path -> bytes), stamp excluded.

    The runtime's .py files and kernel sources verbatim, except ``__init__.py``, which
    is the runtime's own followed by the template footer that exports ``TopK``.
    """
    runtime = _runtime_dir()
    files: Dict[str, bytes] = {}
    for path in sorted(runtime.rglob("*")):
        relative = path.relative_to(runtime)
        if not path.is_file() or "__pycache__" in relative.parts or any(p.startswith(".") for p in relative.parts):
            continue
        if path.suffix == ".py" or path.suffix in KERNEL_SOURCE_SUFFIXES:
            files[relative.as_posix()] = path.read_bytes()
    templates = _templates_dir()
    footer = (templates / INIT_FOOTER).read_bytes()
    head = files.get("__init__.py", b"")
    if head and not head.endswith(b"\n"):
        head += b"\n"
    files["__init__.py"] = head + (b"\n" if head else b"") + footer
    files[LAYER_MODULE] = (templates / LAYER_MODULE).read_bytes()
    return files


def content_hash(files: Dict[str, bytes]) -> str:
    """sha256 over the sorted (path, bytes) pairs: the identity of a vendored build."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        digest.update(name.encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def _read_tree(directory: Path) -> Dict[str, bytes]:
    files: Dict[str, bytes] = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and "__pycache__" not in relative.parts and relative.as_posix() != STAMP_NAME:
            files[relative.as_posix()] = path.read_bytes()
    return files


# ------------------------------------------------------------------------------ status


@dataclass(frozen=True)
class VendoredInfo:
    """What `ecpatch status` shows about the vendored package of one SGLang tree.

    ``version``/``content_hash``: what the stamp records (the ecpatch that wrote it);
    ``up_to_date``: the stamp matches this ecpatch's version and files, and the files on
    disk still match the stamp; ``state`` says the same in words, with the fix.
    """

    version: str
    up_to_date: bool
    state: str
    min_tokens: Optional[int]
    layers: Optional[str]
    content_hash: str
    intact: bool
    path: str


def _read_stamp(directory: Path) -> Optional[dict]:
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("tool") != STAMP_TOOL:
        return None
    return stamp


def vendored_info(root: Path) -> Optional[VendoredInfo]:
    """The vendored package of `root`, or None when there is none (or it is not ours)."""
    directory = vendored_dir(root)
    stamp = _read_stamp(directory)
    if stamp is None:
        return None
    recorded = str(stamp.get("content_hash", ""))
    intact = content_hash(_read_tree(directory)) == recorded
    version = str(stamp.get("version", "?"))
    same_build = version == __version__ and recorded == content_hash(package_files())
    if not intact:
        state = "files edited since enable (ecpatch enable rewrites them)"
    elif same_build:
        state = "current"
    elif version != __version__:
        state = f"written by ecpatch {version}, this is {__version__} (ecpatch enable updates it)"
    else:
        state = "written by another build of this version (ecpatch enable updates it)"
    return VendoredInfo(
        version=version,
        up_to_date=intact and same_build,
        state=state,
        min_tokens=stamp.get("min_tokens"),
        layers=stamp.get("layers"),
        content_hash=recorded[:12],
        intact=intact,
        path=str(directory),
    )


# ----------------------------------------------------------------------------- install


def _check_settings(min_tokens, layers) -> tuple:
    """Validate the enable-time settings with the runtime's own parsers (ValueError names them)."""
    from sgl_ecpatch.runtime.config import describe_layers, parse_layer_spec, parse_min_tokens

    if min_tokens is not None:
        min_tokens = parse_min_tokens(min_tokens, name="--min-tokens")
    if layers is not None:
        text = str(layers).strip()
        if text.lower() in ("all", "*"):
            layers = None
        else:
            try:
                layers = describe_layers(parse_layer_spec(text))
            except ValueError as exc:
                raise ValueError(f"--layers {text!r}: {exc}") from None
    return min_tokens, layers


def install(root: Path, *, min_tokens: Optional[int] = None, layers: Optional[str] = None,
            dry_run: bool = False) -> str:
    """Write (or update) ``<root>/srt/layers/moe/expert_choice/``; return one line saying what.

    ``min_tokens``/``layers`` become the package's defaults (the environment variables
    ``SGLANG_EXPERT_CHOICE_MIN_TOKENS`` / ``SGLANG_EXPERT_CHOICE_LAYERS`` override them at
    server start). None keeps what an existing stamp has (so a plain re-run of enable
    does not forget them); ``layers="all"`` clears a layer set. Bad values raise
    ValueError naming the option.
    """
    root = Path(root)
    if not (root / "srt" / "layers" / "moe" / "topk.py").is_file():
        raise ValueError(f"{root} is not an SGLang package directory (no srt/layers/moe/topk.py)")
    min_tokens_given, layers_given = min_tokens is not None, layers is not None
    min_tokens, layers = _check_settings(min_tokens, layers)
    directory = vendored_dir(root)
    old_stamp = _read_stamp(directory)
    if directory.exists() and old_stamp is None:
        raise ValueError(f"{directory} exists but was not written by ecpatch; move it away first")
    if old_stamp is not None:
        if not min_tokens_given:
            min_tokens = old_stamp.get("min_tokens")
        if not layers_given:
            layers = old_stamp.get("layers")

    files = package_files()
    digest = content_hash(files)
    stamp = {
        "tool": STAMP_TOOL,
        "version": __version__,
        "content_hash": digest,
        "min_tokens": min_tokens,
        "layers": layers,
        "files": sorted(files),
    }
    settings = f"min_tokens={min_tokens if min_tokens is not None else 0}, layers={layers or 'all'}"
    where = f"{directory}"
    if old_stamp is not None and old_stamp == stamp and content_hash(_read_tree(directory)) == digest:
        return f"vendored expert-choice package up to date ({where}, ecpatch {__version__}, {settings})"
    verb = "update" if old_stamp is not None else "install"
    if dry_run:
        return f"would {verb} the vendored expert-choice package ({where}, ecpatch {__version__}, {settings})"

    files[STAMP_NAME] = (json.dumps(stamp, indent=2, sort_keys=True) + "\n").encode("utf-8")
    token = uuid.uuid4().hex[:8]
    staging = directory.with_name(f".{directory.name}.tmp-{token}")
    try:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if directory.exists():
            # Two renames: a crash between them leaves the old package beside, never half a new one.
            retired = directory.with_name(f".{directory.name}.old-{token}")
            os.rename(directory, retired)
            os.rename(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    done = "updated" if verb == "update" else "installed"
    return f"{done} the vendored expert-choice package ({where}, ecpatch {__version__}, {settings})"


def remove(root: Path, *, dry_run: bool = False) -> bool:
    """Delete the vendored package of `root` (the whole directory); True if there was one.

    A directory of that name that ecpatch did not write (no stamp) is left alone.
    """
    directory = vendored_dir(root)
    if not directory.is_dir() or _read_stamp(directory) is None:
        return False
    if not dry_run:
        shutil.rmtree(directory)
    return True
