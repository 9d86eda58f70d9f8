"""Install / inspect / remove the vendored expert-choice package in an SGLang tree (stub).

Contract used by the CLI (sgl_ecpatch.cli):
    find_sglang_root(path: Path) -> Path | None
        The `sglang` package directory that holds `path` (has srt/layers/moe/topk.py).
    vendored_info(root: Path) -> VendoredInfo | None
    install(root: Path, *, min_tokens: int | None, layers: str | None, dry_run: bool) -> str
        Writes <root>/srt/layers/moe/expert_choice/ ; returns a one-line description.
    remove(root: Path, *, dry_run: bool) -> bool
VENDORED_IMPORT = "sglang.srt.layers.moe.expert_choice"
"""

from __future__ import annotations

from pathlib import Path

VENDORED_PACKAGE = "sglang.srt.layers.moe.expert_choice"


def find_sglang_root(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if parent.name == "sglang" and (parent / "srt" / "layers" / "moe" / "topk.py").is_file():
            return parent
    return None


def vendored_info(root: Path):
    return None


def install(root: Path, *, min_tokens=None, layers=None, dry_run=False) -> str:
    return "vendoring not implemented yet"


def remove(root: Path, *, dry_run=False) -> bool:
    return False
