"""The ``ecpatch`` command line: enable / disable / status (+ the commands of other areas).

The CLI only loops over files, prints and picks the exit code; the work is done by the pure
functions of `sgl_ecpatch.patcher`. Data (diffs, JSON, the status table) goes to stdout,
everything else to stderr (`sgl_ecpatch.ui`).

Exit codes: 0 done or nothing to do; 1 ``--check`` / ``--diff`` found changes to make;
2 usage or input errors (a batch reports every file first, then exits 2).
"""

from __future__ import annotations

import functools
import json
import os
import traceback
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterable, List, Optional

import typer

from sgl_ecpatch import ui
from sgl_ecpatch.patcher import files as pfiles
from sgl_ecpatch.patcher.model import (
    DEFAULT_CAPACITY_FACTOR,
    DEFAULT_ENV_VAR,
    CallInfo,
    Changed,
    Failed,
    Mode,
    PatchOptions,
    PatchResult,
    State,
    Unchanged,
    env_value,
)

BACKEND_ENV_VAR = "SGLANG_EXPERT_CHOICE_BACKEND"
PROGRESS_MIN_FILES = 20

app = typer.Typer(
    name="ecpatch",
    help="Expert-choice MoE routing for SGLang, switched on and off with one command.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_settings = {"verbose": False}

# Options shared by several commands.
PathsArg = Annotated[List[Path], typer.Argument(
    help="Model files, folders (searched recursively) or SGLang roots.", show_default=False)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Report what would change; write nothing.")]
Diff = Annotated[bool, typer.Option(
    "--diff", help="Print a unified diff (git apply accepts it) on stdout; write nothing. Exit 1 if there are changes.")]
Check = Annotated[bool, typer.Option("--check", help="Write nothing; exit 1 if changes would be made.")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Show tracebacks on errors.")]


@app.callback()
def _root(verbose: Verbose = False) -> None:
    """Expert-choice MoE routing for SGLang, switched on and off with one command.

    Start with `ecpatch enable --diff path/to/sglang/srt/models/qwen2_moe.py`.
    """
    _settings["verbose"] = verbose  # reset on every invocation; a command's own --verbose adds to it


def _guarded(command: Callable) -> Callable:
    """Turn `ui.UsageError` and unexpected exceptions into one red line and exit code 2.

    Applied to every command of the app, those of other areas included (`_guard_commands`)."""
    if getattr(command, "_ecpatch_guarded", False):
        return command

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        if kwargs.get("verbose"):
            _settings["verbose"] = True
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except ui.UsageError as exc:
            ui.error(exc.message, hint=exc.hint)
            raise typer.Exit(ui.EXIT_USAGE)
        except Exception as exc:  # a bug: say so, with the traceback on request
            if _settings["verbose"]:
                ui.console.print(traceback.format_exc(), markup=False)
            ui.error(f"internal error: {type(exc).__name__}: {exc}",
                     hint="run again with --verbose to see the traceback")
            raise typer.Exit(ui.EXIT_USAGE)

    wrapper._ecpatch_guarded = True  # type: ignore[attr-defined]
    return wrapper


# ---- enable / disable --------------------------------------------------------------------


@app.command()
def enable(
    paths: PathsArg,
    mode: Annotated[Mode, typer.Option(
        "--mode", help="env: switch on with an environment variable at run time; on: always on.")] = Mode.env,
    env_var: Annotated[str, typer.Option("--env-var", help="Environment variable read in env mode.")] = DEFAULT_ENV_VAR,
    capacity_factor: Annotated[float, typer.Option(
        "--capacity-factor", help="Expert capacity factor: each expert takes ceil(T*k*F/E) tokens (F > 0).")]
    = DEFAULT_CAPACITY_FACTOR,
    min_tokens: Annotated[Optional[int], typer.Option(
        "--min-tokens", help="Below this many tokens a layer keeps SGLang's own top-k (passed to the vendored package).")]
    = None,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="Layers that use expert choice, e.g. 0-15,32 (passed to the vendored package).")] = None,
    dry_run: DryRun = False,
    diff: Diff = False,
    check: Check = False,
    verbose: Verbose = False,
) -> None:
    """Patch the TopK(...) calls of SGLang model files for expert-choice routing.

    Each supported call gains use_expert_choice= and expert_capacity_factor=, and the file
    imports the vendored TopK (installed into the SGLang tree). Calls that expert choice
    does not cover (grouped top-k, custom routing functions) are left unchanged and listed.
    Running it again with other options updates the calls in place.
    """
    options = PatchOptions(mode=mode, env_var=env_var, capacity_factor=capacity_factor)
    problem = options.validate()
    if problem:
        raise ui.UsageError(problem, hint="e.g. --capacity-factor 1.25 --env-var SGLANG_EXPERT_CHOICE")
    if min_tokens is not None and min_tokens < 0:
        raise ui.UsageError(f"--min-tokens must be >= 0, got {min_tokens}")
    from sgl_ecpatch.patcher.rewrite import enable_source

    models, bad_paths, _ = _collect_or_fail(paths)
    install = not (diff or check)
    vendor = _vendor() if install else None
    if vendor is not None and (min_tokens is not None or layers is not None):
        for root in _roots(m.path for m in models):  # refuse bad settings before writing any file
            _install(vendor, root, min_tokens=min_tokens, layers=layers, dry_run=True)

    report = _run_batch(models, lambda text, name: enable_source(text, options, filename=name),
                        verb="patched", dry_run=dry_run, diff=diff, check=check, errors=bad_paths)

    if vendor is not None:
        # Install where a file was (or, with --dry-run, would be) written; also where patched
        # files lack the package or hold an older one, or where new settings were given.
        by_root: dict[Optional[Path], list[_Outcome]] = {}
        for outcome in report.ended_patched:
            by_root.setdefault(_root_of(outcome.path), []).append(outcome)
        for outcome in by_root.pop(None, []):
            ui.warn(f"{pfiles.display_path(outcome.path)}: not inside an SGLang tree, so the vendored "
                    "expert-choice package could not be installed; the file will not import until it is",
                    hint="patch the file inside an SGLang tree: a package folder named sglang that holds "
                         "srt/layers/moe/topk.py (e.g. site-packages/sglang or a checkout's python/sglang)")
        for root, outcomes in by_root.items():
            touched = any(o.written or (dry_run and o.changed) for o in outcomes)
            info = vendor.vendored_info(root)
            outdated = info is None or not getattr(info, "up_to_date", True)
            if touched or outdated or min_tokens is not None or layers is not None:
                message = _install(vendor, root, min_tokens=min_tokens, layers=layers, dry_run=dry_run)
                ui.info(f"{pfiles.display_path(root)}: {message}")
    _finish(report, diff=diff, check=check, dry_run=dry_run)


@app.command()
def disable(
    paths: PathsArg,
    remove: Annotated[bool, typer.Option(
        "--remove/--set-false",
        help="--remove: take out everything enable added (original bytes back). "
             "--set-false: keep the arguments, write use_expert_choice=False.")] = True,
    dry_run: DryRun = False,
    diff: Diff = False,
    check: Check = False,
    verbose: Verbose = False,
) -> None:
    """Undo enable: remove the expert-choice arguments, or switch them off in place.

    After --remove, when no file of an SGLang tree imports the vendored package any more,
    the vendored package is removed from that tree too.
    """
    from sgl_ecpatch.patcher.rewrite import disable_source

    models, bad_paths, _ = _collect_or_fail(paths)
    report = _run_batch(models, lambda text, name: disable_source(text, remove=remove, filename=name),
                        verb="restored" if remove else "switched off", dry_run=dry_run, diff=diff, check=check,
                        errors=bad_paths)
    if remove and not (diff or check):
        vendor = _vendor()
        for root in _roots(o.path for o in report.outcomes if o.written or (dry_run and o.changed)):
            changed = [o.path for o in report.outcomes if o.changed]
            if not pfiles.marker_remains(root, ignore=changed):
                removed = vendor.remove(root, dry_run=dry_run)
                if removed:
                    verb = "would remove" if dry_run else "removed"
                    ui.info(f"{pfiles.display_path(root)}: {verb} the vendored expert-choice package")
    _finish(report, diff=diff, check=check, dry_run=dry_run)


class _Outcome:
    """What happened to one file in a batch."""

    def __init__(self, path: Path, result: PatchResult, written: bool = False) -> None:
        self.path = path
        self.result = result
        self.written = written

    @property
    def changed(self) -> bool:
        return isinstance(self.result, Changed)

    @property
    def calls(self) -> tuple[CallInfo, ...]:
        return getattr(self.result, "calls", ())


class _Report:
    def __init__(self, errors: int = 0) -> None:
        self.outcomes: list[_Outcome] = []
        self.errors = errors  # files that failed (bad paths included)

    @property
    def ended_patched(self) -> list[_Outcome]:
        """Files whose calls use expert choice after this run (written or already so)."""
        return [o for o in self.outcomes if any(c.has_switch for c in o.calls)]


def _run_batch(models: list, transform: Callable[[str, str], PatchResult], *, verb: str,
               dry_run: bool, diff: bool, check: bool, errors: int) -> _Report:
    report = _Report(errors)
    write = not (dry_run or diff or check)
    for model in _progress(models, "patching"):
        path = model.path
        name = pfiles.display_path(path)
        result = transform(model.source.text, str(path))
        outcome = _Outcome(path, result)
        report.outcomes.append(outcome)
        if isinstance(result, Failed):
            _report_failure(name, result)
            report.errors += 1
            continue
        for call in getattr(result, "unsupported", ()):
            target = call.target or "TopK(...)"
            ui.warn(f"{name}:{call.line} {target}: left unchanged: {call.reason}")
        if not isinstance(result, Changed):
            ui.info(f"{name}: unchanged" + (f" ({result.reason})" if result.reason else ""))
            continue
        if diff:
            ui.data(pfiles.unified_diff(model.source.text, result.new_code, path))
        if write:
            try:
                pfiles.write_atomic(path, model.source.encode(result.new_code))
            except OSError as exc:
                ui.error(f"{name}: cannot write: {exc.strerror or exc}",
                         hint="check the file's permissions; nothing was changed")
                report.errors += 1
                continue
            outcome.written = True
            ui.success(f"{name}: {verb} ({_describe(result.calls)})")
        else:
            ui.info(f"{name}: would be {verb} ({_describe(result.calls)})")
    return report


def _describe(calls: Iterable[CallInfo]) -> str:
    parts = []
    for call in calls:
        if call.state == State.unsupported:
            continue
        switch = {State.env: f"env {call.env_var}", State.on: "always on", State.false: "use_expert_choice=False",
                  State.off: "not patched"}[call.state]
        cf = f", capacity factor {call.capacity_factor:g}" if call.capacity_factor is not None else ""
        parts.append(f"{call.target or 'TopK'} line {call.line}: {switch}{cf}")
    return "; ".join(parts) or "no supported call"


def _report_failure(name: str, failure: Failed) -> None:
    where = f"{name}:{failure.line}" if failure.line else name
    if failure.traceback and _settings["verbose"]:
        ui.console.print(failure.traceback, markup=False)
    ui.error(f"{where}: {failure.error}", hint=failure.hint)


def _finish(report: _Report, *, diff: bool, check: bool, dry_run: bool) -> None:
    changed = sum(o.changed for o in report.outcomes)
    unchanged = sum(isinstance(o.result, Unchanged) for o in report.outcomes)
    unsupported = sum(len(getattr(o.result, "unsupported", ())) for o in report.outcomes)
    pending = diff or check or dry_run
    summary = (f"{changed} file{'s' if changed != 1 else ''} {'to change' if pending else 'changed'}, "
               f"{unchanged} unchanged, {unsupported} unsupported call{'s' if unsupported != 1 else ''} "
               f"left alone, {report.errors} error{'s' if report.errors != 1 else ''}")
    if report.errors:
        ui.error(summary)
        raise typer.Exit(ui.EXIT_USAGE)
    ui.info(summary)
    if changed and (diff or check):
        raise typer.Exit(ui.EXIT_CHANGES)


def _collect_or_fail(paths: list[Path]) -> tuple[list, int, dict[Path, bytes]]:
    """Model files under `paths`, the number of bad paths (each reported) and the texts read;
    exit 2 if there is no model file."""
    with _spinner("looking for TopK(...) calls"):
        models, errors, texts = pfiles.collect(paths)
    for problem in errors:
        _report_failure(pfiles.display_path(problem.path), problem.failure)
    if not models:
        raise typer.Exit(ui.EXIT_USAGE)
    return models, len(errors), texts


def _progress(items: list, label: str):
    if len(items) < PROGRESS_MIN_FILES or not ui.stderr_is_terminal():
        yield from items
        return
    from rich.progress import Progress

    with Progress(console=ui.console, transient=True) as progress:
        task = progress.add_task(label, total=len(items))
        for item in items:
            yield item
            progress.advance(task)


def _spinner(label: str):
    return ui.console.status(label) if ui.stderr_is_terminal() else nullcontext()


# ---- vendoring hooks (sgl_ecpatch.vendor, owned by the integration area) ---------------------


def _vendor():
    from sgl_ecpatch import vendor

    return vendor


def _root_of(path: Path) -> Optional[Path]:
    return _vendor().find_sglang_root(path.resolve())


def _roots(paths: Iterable[Path]) -> list[Path]:
    roots: list[Path] = []
    for path in paths:
        root = _root_of(path)
        if root is not None and root not in roots:
            roots.append(root)
    return roots


def _install(vendor, root: Path, *, min_tokens, layers, dry_run: bool) -> str:
    try:
        return vendor.install(root, min_tokens=min_tokens, layers=layers, dry_run=dry_run)
    except ValueError as exc:
        raise ui.UsageError(f"{pfiles.display_path(root)}: {exc}",
                            hint="check --min-tokens and --layers (e.g. --layers 0-15,32)")


# ---- status ----------------------------------------------------------------------------------


@app.command()
def status(
    paths: Annotated[Optional[List[Path]], typer.Argument(
        help="Model files, folders or SGLang roots (default: the installed sglang package).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array, one object per call, on stdout.")]
    = False,
    verbose: Verbose = False,
) -> None:
    """Show every TopK(...) call: where, which attribute, its state and capacity factor.

    States: off (not patched), env (switched by an environment variable; the table shows
    what this shell resolves it to), on, false (disable --set-false), unsupported (left
    alone, with the reason). Also shows, per SGLang tree, the vendored package, the kernel
    build and the backend variable.
    """
    paths = list(paths or [_installed_sglang()])
    models, bad_paths, texts = _collect_or_fail(paths)
    rows = []
    importer_cache: dict[Path, dict[Path, bytes]] = {}
    for model in models:
        imported_by: list[str] = []
        # Patching a module changes every model that imports from it (qwen3_next.py reuses
        # qwen2_moe.py's Qwen2MoeSparseMoeBlock): say so for every file ecpatch can patch.
        if any(call.state != State.unsupported for call in model.inspection.calls):
            imported_by = _importers(model.path, texts, importer_cache)
        for call in model.inspection.calls:
            rows.append(_row(model.path, call, imported_by))
    if as_json:
        ui.data(json.dumps(rows, indent=2) + "\n")
    else:
        _print_table(rows)
        _print_roots(models)
    if bad_paths:
        raise typer.Exit(ui.EXIT_USAGE)


def _installed_sglang() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ui.UsageError("no PATH given and no sglang package is installed in this Python",
                            hint="pass a path: ecpatch status path/to/sglang/srt/models")
    return Path(list(spec.submodule_search_locations)[0])


def _importers(path: Path, texts: dict[Path, bytes], cache: dict) -> list[dict]:
    root = _root_of(path)
    key = (root / "srt" / "models") if root is not None else path.parent
    if key not in cache:
        cache[key] = pfiles.sibling_candidates(path, root, known=texts)
    return [{"file": pfiles.display_path(p), "names": list(names)}
            for p, names in pfiles.importers(path, cache[key], root)]


def _row(path: Path, call: CallInfo, imported_by: list[dict]) -> dict:
    value = env_value(call.env_var) if call.state == State.env and call.env_var else None
    return {
        "file": pfiles.display_path(path),
        "line": call.line,
        "target": call.target,
        "state": call.state.value,
        "capacity_factor": call.capacity_factor,
        "reason": call.reason,
        "env_var": call.env_var,
        "env_value": value,
        "imported_by": imported_by,
    }


def _print_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=None, show_lines=False)
    for column in ("call", "target", "state", "cf", "switch", "notes"):
        table.add_column(column, overflow="fold")
    styles = {"env": "cyan", "on": "green", "false": "yellow", "off": "dim", "unsupported": "red"}
    for row in rows:
        switch = ""
        if row["env_var"]:
            switch = f"{row['env_var']} -> {'on' if row['env_value'] else 'off'}"
        notes = row["reason"] or ""
        if row["imported_by"]:
            notes = "imported by " + "; ".join(
                f"{Path(i['file']).name} ({', '.join(i['names'])})" for i in row["imported_by"])
        cf = "" if row["capacity_factor"] is None else f"{row['capacity_factor']:g}"
        table.add_row(f"{row['file']}:{row['line']}", row["target"] or "-",
                      f"[{styles[row['state']]}]{row['state']}[/]", cf, switch, notes)
    ui.print_data(table)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    ui.info(f"{len(rows)} TopK call{'s' if len(rows) != 1 else ''}: "
            + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))


def _print_roots(models: list) -> None:
    vendor = _vendor()
    backend = os.environ.get(BACKEND_ENV_VAR)
    for root in _roots(m.path for m in models):
        info = vendor.vendored_info(root)
        lines = [f"SGLang tree {pfiles.display_path(root)}"]
        if info is None:
            lines.append("  vendored package: not installed (ecpatch enable installs it)")
            lines.append("  kernel: not checked (nothing in this tree uses it)")
        else:
            lines.append(f"  vendored package: {_fields(info)}")
            lines.append(f"  kernel: {_kernel_status()}")
            lines.append(f"  kernel knobs in this shell: {_kernel_knobs()}")
        lines.append(f"  {BACKEND_ENV_VAR}={backend if backend is not None else '(unset: auto)'}")
        ui.data_console.print("\n".join(lines), markup=False)


def _fields(info) -> str:
    if is_dataclass(info) and not isinstance(info, type):
        fields = asdict(info)
    elif hasattr(info, "_asdict"):
        fields = info._asdict()
    elif isinstance(info, dict):
        fields = info
    elif hasattr(info, "__dict__"):
        fields = vars(info)
    else:
        return str(info)
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def _kernel_report(attr: str, missing: str) -> str:
    """`str(kernel.<attr>())` of the runtime's kernel package, or why it cannot be had."""
    # Imported only here: the runtime pulls in torch, which `status` should not pay for otherwise.
    try:
        from sgl_ecpatch.runtime import kernel
    except Exception as exc:  # torch missing or broken: say so instead of failing status
        return f"unavailable ({type(exc).__name__}: {exc})"
    report = getattr(kernel, attr, None)
    if report is None:
        return f"unknown (this ecpatch has no {missing})"
    try:
        return str(report())
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"


def _kernel_status() -> str:
    return _kernel_report("build_status", "kernel build report")


def _kernel_knobs() -> str:
    """The SGL_ECPATCH_KERNEL_* tuning knobs set here (a server started from this shell
    inherits them), with a value that would make every kernel call raise called out."""
    return _kernel_report("knobs_text", "knob report")


# ---- the commands of other areas ------------------------------------------------------------


def _register_other_areas() -> None:
    from sgl_ecpatch.commands import bench, kernel, revert

    for module in (revert, kernel, bench):
        module.register(app)


def _guard_commands(typer_app: typer.Typer) -> None:
    """Give every command (sub-apps included) the same error handling and exit codes."""
    for info in typer_app.registered_commands:
        if info.callback is not None:
            info.callback = _guarded(info.callback)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _guard_commands(group.typer_instance)


_register_other_areas()
_guard_commands(app)


def main() -> None:
    """Console-script entry point (`ecpatch`)."""
    app()


if __name__ == "__main__":
    main()
