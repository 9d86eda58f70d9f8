"""`ecpatch bench` and `ecpatch advise`: measured numbers and the advice drawn from them.

Data (tables, JSON, CSV) goes to stdout; progress, notes and errors to stderr.
Exit codes: 0 done, 2 usage or input error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

EXIT_USAGE = 2


# ------------------------------------------------------------------ output helpers

def _console():
    from sgl_ecpatch import ui

    return ui.console


def _data_console():
    from sgl_ecpatch import ui

    return ui.data_console


def _fail(message: str, hint: str | None = None) -> typer.Exit:
    """One red line on stderr (sgl_ecpatch.ui), then exit code 2: `raise _fail(...)`."""
    from sgl_ecpatch import ui

    ui.error(message, hint=hint)
    return typer.Exit(EXIT_USAGE)


def _note(message: str) -> None:
    from sgl_ecpatch import ui

    ui.info(f"note: {message}")


def _int_list(text: str, option: str, *, minimum: int = 1) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise _fail(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise _fail(f"{option} values must be integers >= {minimum}, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _stderr_is_terminal() -> bool:
    from sgl_ecpatch import ui

    return ui.stderr_is_terminal()


class _Progress:
    """A rich progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, total: int | None):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                  console=_console(), transient=True, disable=not _stderr_is_terminal())
        self._task = None
        self._total = total

    def __enter__(self):
        self._progress.__enter__()
        self._task = self._progress.add_task("bench", total=self._total)
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def __call__(self, description: str) -> None:
        self._progress.update(self._task, description=description, advance=1)


# ------------------------------------------------------------------ bench

def _command_line(ctx: typer.Context, name: str) -> str:
    """The command as the user could type it again: the options that differ from their defaults."""
    parts = ["ecpatch", name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name not in ctx.params or value == param.default or not getattr(param, "opts", None):
            continue
        flag = param.opts[0]
        if isinstance(value, bool):
            parts.append(flag)
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def bench(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Preset(s), comma-separated: qwen2-moe, qwen3-moe, qwen3-next, mixtral, olmoe, or all.")] = None,
    experts: Annotated[Optional[int], typer.Option(help="Custom router: number of experts (with --top-k).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Custom router: slots per token.")] = None,
    tokens: Annotated[Optional[str], typer.Option(
        help="Token counts for the routing benchmark (default 1..16384 on a GPU, 1,16,256,1024 on the CPU).")] = None,
    methods: Annotated[str, typer.Option(
        help="Routing methods: topk, sglang, seed-ec, ec-torch-drop, ec-torch-topk, ec-cuda-drop, ec-cuda-topk.")
    ] = "topk,sglang,seed-ec,ec-torch-drop,ec-torch-topk,ec-cuda-drop,ec-cuda-topk",
    parts: Annotated[str, typer.Option(
        help="What to run: routing, load, layer (GPU only), expert-time. Default: routing,load "
             "(+ layer,expert-time on a GPU).")] = "",
    skews: Annotated[str, typer.Option(
        help="Router skews for the load study: uniform, zipf-S, corr-RHO[xGROUPS], or a '+' of them.")
    ] = "uniform,zipf-0.25,zipf-0.5,zipf-1,corr-0.5",
    ep_ranks: Annotated[str, typer.Option("--ep-ranks", help="Expert-parallel rank counts for the load study.")
                        ] = "1,2,4,8",
    load_tokens: Annotated[str, typer.Option(help="Token counts for the load study.")] = "256,4096",
    capacity_factor: Annotated[float, typer.Option(help="Expert-choice capacity factor.")] = 1.25,
    seeds: Annotated[int, typer.Option(help="Random draws averaged in the load study.")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(
        help="CPU threads for torch (1 gives steadier CPU times on a busy machine).")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer timing repeats.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (measured-table format) as JSON.")
                       ] = False,
    csv_path: Annotated[Optional[str], typer.Option("--csv", help="Write the result as CSV to FILE ('-': stdout).")
                        ] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write plots to FILE.png (needs matplotlib).")
                         ] = None,
    save_table: Annotated[Optional[Path], typer.Option(
        help="Write the result as a measured table that `ecpatch advise --table` reads.")] = None,
) -> None:
    """Measure routing time, load balance and (on a GPU) MoE layer time: token choice vs expert choice.

    On the CPU, times are CPU times, not GPU times: compare methods with them, nothing more.
    """
    from sgl_ecpatch import ui
    from sgl_ecpatch.bench import output, presets as presets_mod, runner
    from sgl_ecpatch.bench.distributions import parse_skew
    from sgl_ecpatch.bench.routing import ALL_METHODS, CPU_TOKENS, DEFAULT_TOKENS

    if as_json and csv_path == "-":
        raise _fail("--json and --csv - both write to stdout; pick one (or give --csv a file)")
    try:
        if model is not None and (experts is not None or top_k is not None):
            raise ValueError("give either --model or --experts/--top-k, not both")
        if experts is not None or top_k is not None:
            chosen = [presets_mod.resolve(None, experts, top_k)]
        elif model is None or model.strip().lower() == "all":
            chosen = [presets_mod.PRESETS[name] for name in presets_mod.DEFAULT_PRESETS]
        else:
            chosen = [presets_mod.resolve(name, None, None) for name in _str_list(model)]
        dev = runner.resolve_device(device)
        method_list = _str_list(methods)
        bad = [m for m in method_list if m not in ALL_METHODS]
        if bad:
            raise ValueError(f"unknown --methods {', '.join(bad)}; known: {', '.join(ALL_METHODS)}")
        skew_list = _str_list(skews)
        for skew in skew_list:
            parse_skew(skew)
        if not (capacity_factor > 0 and capacity_factor != float("inf")):
            raise ValueError(f"--capacity-factor must be a finite number > 0, got {capacity_factor}")
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
    except ValueError as exc:
        raise _fail(str(exc), hint="ecpatch bench --help") from None
    if threads is not None:
        if threads < 1:
            raise _fail(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    token_list = _int_list(tokens, "--tokens") if tokens else list(DEFAULT_TOKENS if dev.type == "cuda"
                                                                    else CPU_TOKENS)
    part_list = _str_list(parts) or (["routing", "load", "layer", "expert-time"] if dev.type == "cuda"
                                     else ["routing", "load"])
    rank_list = _int_list(ep_ranks, "--ep-ranks")
    load_list = _int_list(load_tokens, "--load-tokens")
    if dev.type != "cuda":
        _note(output.CPU_NOTE)
        if "layer" in part_list:
            _note("part 'layer' needs a CUDA device: skipped")
    shapes = len({(p.experts, p.top_k) for p in chosen})
    total = 0
    if "routing" in part_list:
        total += shapes * len(token_list) * len(method_list) * (2 if dev.type == "cuda" else 1)
    if "load" in part_list:
        total += shapes * len(load_list) * len(skew_list)
    command = _command_line(ctx, "bench")
    try:
        with _Progress(total or None) as progress:
            result = runner.run_bench(chosen, device=dev, parts=part_list, tokens=token_list, methods=method_list,
                                      skews=skew_list, ranks=rank_list, load_tokens=load_list,
                                      capacity_factor=capacity_factor, seeds=seeds, quick=quick, command=command,
                                      progress=progress)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    stdout_taken = as_json or csv_path == "-"
    if as_json:
        ui.data(json.dumps(result, indent=1) + "\n")
    if csv_path is not None:
        text = output.to_csv(result)
        if csv_path == "-":
            ui.data(text)
        else:
            Path(csv_path).write_text(text, encoding="utf-8")
            ui.info(f"wrote {csv_path}")
    if save_table is not None:
        from sgl_ecpatch.bench import table as table_mod

        table_mod.save(result, save_table)
        ui.info(f"wrote {save_table} (measured-table format)")
    if plot_path is not None:
        try:
            output.plot(result, plot_path)
        except output.PlotUnavailable as exc:
            raise _fail(str(exc)) from None
        ui.info(f"wrote {plot_path}")
    target = _console() if stdout_taken else _data_console()
    if not target.is_terminal:  # a pipe or a file: don't squeeze the tables into 80 columns
        from rich.console import Console

        target = Console(file=target.file, width=200, highlight=False)
    for t in output.rich_tables(result):
        target.print(t)
    if result.get("note"):
        for line in result["note"].split(" | "):
            if line != output.CPU_NOTE:
                _note(line)


# ------------------------------------------------------------------ advise

_VERDICT_STYLE = {"enable": "bold green", "enable-with-options": "bold yellow", "keep-off": "bold red"}
_VERDICT_TEXT = {"enable": "ENABLE", "enable-with-options": "ENABLE WITH OPTIONS", "keep-off": "KEEP OFF"}


def advise(
    model: Annotated[Optional[str], typer.Option("--model", help="Preset: qwen2-moe, qwen3-moe, qwen3-next, "
                                                                  "mixtral, olmoe.")] = None,
    experts: Annotated[Optional[int], typer.Option(help="Custom router: number of experts (with --top-k).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Custom router: slots per token.")] = None,
    tokens: Annotated[Optional[int], typer.Option(
        help="Typical tokens per forward pass (batch size in decode, chunk size in prefill).")] = None,
    ep_ranks: Annotated[int, typer.Option("--ep-ranks", help="Expert-parallel ranks the experts are split over.")
                        ] = 1,
    scenario: Annotated[str, typer.Option(help="online (latency matters) or offline (throughput).")] = "online",
    measure: Annotated[bool, typer.Option(help="Measure routing and the per-expert time here first.")] = False,
    skew: Annotated[str, typer.Option(help="Assumed router skew (see ecpatch bench --skews).")] = "zipf-0.25",
    capacity_factor: Annotated[float, typer.Option(help="Expert-choice capacity factor.")] = 1.25,
    layers: Annotated[Optional[str], typer.Option(help="Layer set to pass through to enable, e.g. 0-15.")] = None,
    table: Annotated[Optional[Path], typer.Option(help="Measured table to use instead of the shipped one.")] = None,
    sglang_root: Annotated[Optional[str], typer.Option(help="SGLang package dir for the printed command.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the advice as JSON on stdout.")] = False,
) -> None:
    """Say whether to switch expert choice on for a model, with the numbers and the exact enable command."""
    from sgl_ecpatch import ui
    from sgl_ecpatch.bench import advise as advise_mod, presets as presets_mod, runner, table as table_mod
    from sgl_ecpatch.bench.distributions import parse_skew

    try:
        preset = presets_mod.resolve(model, experts, top_k)
        if tokens is None:
            raise ValueError("--tokens N is required (typical tokens per forward pass)")
        parse_skew(skew)
        if not (capacity_factor > 0 and capacity_factor != float("inf")):
            raise ValueError(f"--capacity-factor must be a finite number > 0, got {capacity_factor}")
        if layers is not None:
            _check_layers(layers)
        data = table_mod.load(table)
    except (ValueError, table_mod.TableError) as exc:
        raise _fail(str(exc), hint="ecpatch advise --help") from None
    if measure:
        dev = runner.resolve_device("auto")
        if dev.type != "cuda":
            _note("measuring on the CPU: these are CPU times, not GPU times")
        with _Progress(None) as progress:
            data = measure_table(preset, tokens, dev, progress=progress)
    elif data["placeholder"]:
        _note(f"the shipped table is a placeholder ({data['device']}, {data['date']}): its times are not GPU "
              "times; run `ecpatch advise --measure` on your GPU or `python benchmarks/bench_gpu.py`")
    try:
        with _Progress(None) as progress:
            result = advise_mod.advise(preset, tokens, ep_ranks=ep_ranks, scenario=scenario, table=data, skew=skew,
                                       capacity_factor=capacity_factor, layers=layers, sglang_root=sglang_root,
                                       progress=progress)
    except (ValueError, table_mod.TableError) as exc:
        raise _fail(str(exc), hint="ecpatch advise --help") from None
    if as_json:
        ui.data(json.dumps(result, indent=1) + "\n")
        return
    out = _data_console()
    verdict = result["verdict"]
    out.print(f"[{_VERDICT_STYLE[verdict]}]{_VERDICT_TEXT[verdict]}[/] expert choice for {preset.name} "
              f"({preset.experts} experts, top-{preset.top_k}) at {tokens} tokens, {ep_ranks} EP rank(s), "
              f"{scenario}", highlight=False)
    for reason in result["reasons"]:
        out.print(f"  - {reason}", highlight=False)
    src = result["table"]
    out.print(f"  (times: {src['device']}, {src['date']}{', placeholder' if src['placeholder'] else ''}; "
              f"expert time: {result['used']['expert_time_source']}; skew {skew})", highlight=False)
    if result["command"]:
        out.print("apply it with:", highlight=False)
        out.print(f"  {result['command']}", highlight=False, markup=False)
        out.print(f"  {result['switch']}", highlight=False)


def _check_layers(spec: str) -> None:
    try:
        from sgl_ecpatch.runtime.config import parse_layer_spec
    except ImportError:
        return
    parse_layer_spec(spec)


def measure_table(preset, tokens: int, device, *, progress=None) -> dict:
    """A table measured here for one router shape: routing at the advise grid and the
    per-expert time."""
    from sgl_ecpatch.bench import advise as advise_mod, runner

    grid = sorted({t for t in advise_mod.GRID if t < tokens} | {tokens})
    methods = ["topk", "sglang", "ec-torch-drop"] + (["ec-cuda-drop"] if device.type == "cuda" else [])
    parts = ["routing", "expert-time"]
    return runner.run_bench([preset], device=device, parts=parts, tokens=grid, methods=methods, skews=[],
                            load_tokens=[], quick=True, command=f"ecpatch advise --measure (E={preset.experts}, "
                            f"k={preset.top_k})", progress=progress)


def register(app: typer.Typer) -> None:
    """Add `bench` and `advise` to the ecpatch app."""
    app.command("bench")(bench)
    app.command("advise")(advise)
