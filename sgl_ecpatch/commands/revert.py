"""`ecpatch revert`: restore the files ecpatch changed to their committed state (git)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List

import typer

from sgl_ecpatch import ui


def revert(
    paths: Annotated[List[Path], typer.Argument(
        metavar="PATH...", help="Files or folders (e.g. path/to/sglang/srt/models) inside a git work tree.")],
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be restored and removed; change nothing.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Also restore files that hold changes beyond ecpatch's own (those changes are lost).")] = False,
) -> None:
    """Restore, with git, the files under PATH that ecpatch changed to their HEAD version.

    A file is restored only when every difference from HEAD is ecpatch's own (checked by
    taking ecpatch's additions out and comparing with HEAD). A file with other changes is
    refused and the diff of those other changes is printed on stdout; --force restores it
    anyway. The vendored expert-choice package is removed from an SGLang tree when no file
    of the tree imports it any more and git does not track it.

    Exit 0 when everything asked for was restored (or there was nothing to do), 1 when a
    file was refused, 2 on bad input (for example a path outside a git repository: use
    `ecpatch disable --remove PATH` there).
    """
    from sgl_ecpatch import gitrevert
    from sgl_ecpatch.patcher.files import display_path

    try:
        plans = gitrevert.plan_revert(paths, force=force)
    except gitrevert.NotAGitRepository as exc:
        raise ui.UsageError(
            f"{display_path(exc.path)}: not inside a git repository, so there is no committed version to restore",
            hint=f"ecpatch disable --remove {display_path(exc.path)} takes ecpatch's changes out without git",
        )
    except FileNotFoundError as exc:
        raise ui.UsageError(str(exc))

    verb = "would restore" if dry_run else "restored"
    restored = refused = 0
    for plan in plans:
        for path in plan.untracked:
            ui.warn(f"{display_path(path)}: not tracked by git (no HEAD version); left as it is",
                    hint=f"ecpatch disable --remove {display_path(path)}")
        for path in plan.unchanged:
            ui.info(f"{display_path(path)}: committed with ecpatch's changes; HEAD has it so, nothing to restore")
        for entry in plan.refused:
            refused += 1
            if entry.extra_diff:
                ui.data(entry.extra_diff)
            cause = entry.note or "holds changes beyond ecpatch's own (their diff is on stdout)"
            ui.error(f"{display_path(entry.path)}: {cause}; not restored",
                     hint=f"ecpatch revert --force {display_path(entry.path)} discards them too, "
                          f"or ecpatch disable --remove {display_path(entry.path)} keeps them")
        trees = gitrevert.vendored_to_remove(plan) if dry_run else gitrevert.apply_revert(plan)
        for entry in plan.restore:
            restored += 1
            extra = " (other changes discarded: --force)" if not entry.only_ecpatch else ""
            ui.success(f"{display_path(entry.path)}: {verb} from HEAD{extra}")
        for root in trees:
            ui.info(f"{display_path(root)}: {'would remove' if dry_run else 'removed'} the vendored expert-choice package")
    if not restored and not refused:
        ui.info("nothing to restore: no file under the given paths differs from HEAD by ecpatch's changes")
    else:
        files = f"{restored} file{'s' if restored != 1 else ''}"
        ui.info(f"{files} {'to restore (dry run)' if dry_run else 'restored'}, {refused} refused")
    if refused:
        raise typer.Exit(ui.EXIT_CHANGES)


def register(app: typer.Typer) -> None:
    """Add `ecpatch revert` to the ecpatch app."""
    app.command(name="revert")(revert)
