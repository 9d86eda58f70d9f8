"""`ecpatch build-kernel`: build the expert-choice CUDA kernel ahead of a server restart.

The path of the built library goes to stdout (data); progress (a spinner with the
elapsed time), the closing line and errors go to stderr.
Exit codes: 0 built or already cached, 1 the build failed, 2 usage error.
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

EXIT_BUILD_FAILED = 1
EXIT_USAGE = 2


def _ui():
    try:
        from sgl_ecpatch import ui
    except ImportError:  # the shared output helper is missing: plain rich
        return None
    return ui


def _console():
    ui = _ui()
    if ui is not None:
        return ui.console
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _error(message: str, hint: Optional[str] = None) -> None:
    ui = _ui()
    if ui is not None:
        ui.error(message, hint=hint)
    else:
        _console().print(f"[bold red]error:[/] {message}" + (f" (hint: {hint})" if hint else ""), markup=True)


def build_kernel(
    arch: Annotated[
        Optional[str],
        typer.Option("--arch", help="GPU arch to build for, e.g. 90 (H100/H200), 8.0 or sm_89; "
                                    "default: the GPU of this machine."),
    ] = None,
) -> None:
    """Build the expert-choice CUDA kernel now and print where it went.

    Servers build it on first use (once per machine, under a lock shared by the
    tensor-parallel ranks); building it here, before a restart, keeps that out of the
    server's start. The build is cached by sources, flags, torch and CUDA versions
    and GPU arch under $SGL_ECPATCH_CACHE (default ~/.cache/sgl-ecpatch/kernels).
    """
    console = _console()
    try:
        from sgl_ecpatch.runtime import kernel
        from sgl_ecpatch.runtime.kernel import _build
    except Exception as exc:  # torch missing or broken
        _error(f"cannot load the kernel package: {type(exc).__name__}: {exc}",
               hint="install torch with CUDA support in this Python")
        raise typer.Exit(EXIT_BUILD_FAILED)

    try:
        target = _build.normalize_arch(arch) if arch is not None else _build.current_arch()
    except ValueError as exc:
        _error(str(exc), hint="e.g. ecpatch build-kernel --arch 90")
        raise typer.Exit(EXIT_USAGE)
    if target is None:
        _error("no CUDA GPU visible here, so the target arch is unknown",
               hint="name it: ecpatch build-kernel --arch 90")
        raise typer.Exit(EXIT_USAGE)

    cached = _build.cached_library(target)
    start = time.perf_counter()
    if cached is not None:
        path = cached
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(f"expert-choice kernel (sm_{target}): starting", total=None)

            def progress(message: str) -> None:
                bar.update(task, description=f"expert-choice kernel (sm_{target}): {message}")

            try:
                path = kernel.build(target, progress=progress)
            except kernel.KernelBuildError as exc:
                bar.stop()
                _error(str(exc), hint="read the log; CUDA_HOME must point at a toolkit whose nvcc "
                                      "matches torch's CUDA major version")
                raise typer.Exit(EXIT_BUILD_FAILED)
    seconds = time.perf_counter() - start
    typer.echo(str(path))
    what = "already built" if cached is not None else f"built in {seconds:.1f} s"
    console.print(f"expert-choice kernel for sm_{target}: {what}, cached at {path.parent}",
                  markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ecpatch app."""
    app.command("build-kernel", context_settings={"help_option_names": ["-h", "--help"]})(build_kernel)
