"""The measured table: what `ecpatch bench --save-table` and `benchmarks/bench_gpu.py`
write, and what `ecpatch advise` reads (`sgl_ecpatch/bench/measured_table.json`
ships with the package).

Format (JSON object, `"format": "sgl-ecpatch/measured-table"`, `"version": 1`):

    device        the card (torch.cuda.get_device_name) or "cpu: <processor>"
    device_kind   "cuda" | "cpu"
    placeholder   true when the numbers are not GPU measurements (advise warns)
    date          YYYY-MM-DD of the run
    command       the command that reproduces it
    note          free text
    software      {"torch": ..., "ecpatch": ..., "sglang": ... | null, "kernel": ...}
    routing       [{experts, top_k, tokens, method, mode, us, note}]   (routing.RoutingResult)
    layer         [{shape, hidden, inter, experts, top_k, tokens, method, mode, us, moe_backend, note}]
    expert_time   timemodel.ExpertTimeModel.to_dict()
    load          [study.study_point rows]

All times are medians in microseconds.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from importlib import resources
from pathlib import Path

import torch

from .timemodel import DEFAULT_MODEL, ExpertTimeModel

FORMAT = "sgl-ecpatch/measured-table"
VERSION = 1
SHIPPED = "measured_table.json"
REQUIRED = ("format", "version", "device", "device_kind", "placeholder", "date", "command", "routing",
            "layer", "expert_time", "load")


class TableError(ValueError):
    """A measured table that cannot be read or does not have the format above."""


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}"


def software() -> dict:
    from sgl_ecpatch import __version__

    try:
        from importlib.metadata import version

        sglang = version("sglang")
    except Exception:  # noqa: BLE001
        sglang = None
    try:
        from sgl_ecpatch.runtime.kernel import build_status

        kernel = build_status()
    except Exception:  # noqa: BLE001
        kernel = None
    return {"torch": torch.__version__, "ecpatch": __version__, "sglang": sglang, "kernel": kernel,
            "python": platform.python_version()}


def new_table(*, device: torch.device | str, command: str, note: str = "", placeholder: bool | None = None) -> dict:
    device = torch.device(device)
    return {
        "format": FORMAT,
        "version": VERSION,
        "device": device_name(device),
        "device_kind": device.type,
        "placeholder": device.type != "cuda" if placeholder is None else placeholder,
        "date": _dt.date.today().isoformat(),
        "command": command,
        "note": note,
        "software": software(),
        "routing": [],
        "layer": [],
        "expert_time": DEFAULT_MODEL.to_dict(),
        "load": [],
    }


def validate(table: dict, origin: str = "table") -> dict:
    if not isinstance(table, dict):
        raise TableError(f"{origin}: not a JSON object")
    missing = [key for key in REQUIRED if key not in table]
    if missing:
        raise TableError(f"{origin}: missing keys {', '.join(missing)}")
    if table["format"] != FORMAT:
        raise TableError(f"{origin}: format is {table['format']!r}, expected {FORMAT!r}")
    if table["version"] != VERSION:
        raise TableError(f"{origin}: version {table['version']} is not supported (this ecpatch reads {VERSION})")
    for key in ("routing", "layer", "load"):
        if not isinstance(table[key], list):
            raise TableError(f"{origin}: {key!r} must be a list")
    for row in table["routing"]:
        for key in ("experts", "top_k", "tokens", "method", "mode", "us"):
            if key not in row:
                raise TableError(f"{origin}: a routing row lacks {key!r}: {row}")
    try:
        ExpertTimeModel.from_dict(table["expert_time"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TableError(f"{origin}: bad expert_time: {exc}") from None
    return table


def load(path: str | Path | None = None) -> dict:
    """The table at `path`, or the one shipped in the package."""
    try:
        if path is None:
            text = resources.files("sgl_ecpatch.bench").joinpath(SHIPPED).read_text(encoding="utf-8")
            origin = f"sgl_ecpatch/bench/{SHIPPED}"
        else:
            text = Path(path).read_text(encoding="utf-8")
            origin = str(path)
    except OSError as exc:
        raise TableError(f"cannot read the measured table: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TableError(f"{origin}: not JSON ({exc})") from None
    return validate(data, origin)


def save(table: dict, path: str | Path) -> Path:
    validate(table)
    path = Path(path)
    path.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _interp_loglog(points: list[tuple[int, float]], tokens: int) -> float:
    points = sorted(points)
    if tokens <= points[0][0]:
        return points[0][1]
    if tokens >= points[-1][0]:
        if len(points) == 1:
            return points[-1][1]
        (n0, t0), (n1, t1) = points[-2], points[-1]
    else:
        for (n0, t0), (n1, t1) in zip(points, points[1:]):
            if tokens <= n1:
                break
    if t0 <= 0 or t1 <= 0 or n0 == n1:
        return t0 + (t1 - t0) * (tokens - n0) / max(n1 - n0, 1)
    slope = (math.log(t1) - math.log(t0)) / (math.log(n1) - math.log(n0))
    return math.exp(math.log(t0) + slope * (math.log(tokens) - math.log(n0)))


def routing_shapes(table: dict) -> list[tuple[int, int]]:
    return sorted({(r["experts"], r["top_k"]) for r in table["routing"] if r.get("us") is not None})


def nearest_shape(table: dict, experts: int, top_k: int) -> tuple[int, int] | None:
    shapes = routing_shapes(table)
    if not shapes:
        return None
    return min(shapes, key=lambda s: (abs(math.log(s[0] * s[1]) - math.log(experts * top_k)),
                                      abs(s[0] - experts)))


def preferred_mode(table: dict) -> str:
    modes = {r["mode"] for r in table["routing"] if r.get("us") is not None}
    return "graph" if "graph" in modes else "eager"


def routing_us(table: dict, method: str, experts: int, top_k: int, tokens: int,
               mode: str | None = None) -> tuple[float, tuple[int, int]] | None:
    """Interpolated (log-log in tokens) routing time for `method` at the nearest
    measured (E, k) shape; None when the table has no such method."""
    shape = nearest_shape(table, experts, top_k)
    if shape is None:
        return None
    mode = mode or preferred_mode(table)
    points = [(r["tokens"], r["us"]) for r in table["routing"]
              if (r["experts"], r["top_k"]) == shape and r["method"] == method and r["mode"] == mode
              and r.get("us") is not None]
    if not points:
        return None
    return _interp_loglog(points, tokens), shape


def layer_rows(table: dict, experts: int, top_k: int) -> list[dict]:
    return [r for r in table["layer"] if r["experts"] == experts and r["top_k"] == top_k and r.get("us") is not None]
