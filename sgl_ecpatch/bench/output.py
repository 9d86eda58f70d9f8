"""Bench results as CSV, plots and rich tables. The result is a measured table
(`table.py` format) so that `--json`, `--save-table` and `advise --table` share it."""

from __future__ import annotations

import csv
import io
from collections import defaultdict

CPU_NOTE = ("CPU times are not GPU times: routing on a GPU is a few kernel launches, on the CPU it is "
            "thread-pool work; use these numbers to compare methods on this CPU only")


# ---------------------------------------------------------------- CSV (long format)

CSV_FIELDS = ("section", "experts", "top_k", "tokens", "method", "mode", "skew", "ep_ranks", "metric", "value",
              "note")


def csv_rows(result: dict):
    for r in result["routing"]:
        yield {"section": "routing", "experts": r["experts"], "top_k": r["top_k"], "tokens": r["tokens"],
               "method": r["method"], "mode": r["mode"], "metric": "us", "value": r["us"], "note": r.get("note")}
    for r in result["layer"]:
        yield {"section": "layer", "experts": r["experts"], "top_k": r["top_k"], "tokens": r["tokens"],
               "method": r["method"], "mode": r["mode"], "metric": "us", "value": r["us"],
               "note": r.get("moe_backend") if r.get("note") is None else r["note"]}
    for r in result["load"]:
        base = {"section": "load", "experts": r["experts"], "top_k": r["top_k"], "tokens": r["tokens"],
                "method": r["method"], "skew": r["skew"]}
        for metric in ("slots_kept", "gate_mass", "max_mean_expert", "active_experts"):
            yield {**base, "metric": metric, "value": r.get(metric)}
        for g, v in r["max_mean_rank"].items():
            yield {**base, "ep_ranks": g, "metric": "max_mean_rank", "value": v}
        for g, v in r["slowest_rank_us"].items():
            yield {**base, "ep_ranks": g, "metric": "slowest_rank_us", "value": v}


def to_csv(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(result):
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    return buffer.getvalue()


# ---------------------------------------------------------------- plot

class PlotUnavailable(RuntimeError):
    pass


def _plot_lines(ax, lines: dict, title: str) -> None:
    """One panel: a log-log line of µs over tokens per method."""
    for method, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.set_ylabel("us")


def plot(result: dict, path) -> None:
    """Latency vs tokens (log-log, one line per method, one panel per router shape),
    layer time vs tokens when measured, and max/mean EP-rank load vs skew."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'sgl-ecpatch[plot]' (or pip install matplotlib)") from None

    panels = []
    routing = [r for r in result["routing"] if r.get("us") is not None]
    mode = "graph" if any(r["mode"] == "graph" for r in routing) else "eager"
    shapes = sorted({(r["experts"], r["top_k"]) for r in routing})
    for shape in shapes:
        panels.append(("routing", shape))
    layer = [r for r in result["layer"] if r.get("us") is not None]
    for shape in sorted({(r["shape"], r["experts"], r["top_k"]) for r in layer}):
        panels.append(("layer", shape))
    if result["load"]:
        panels.append(("load", None))
    if not panels:
        raise PlotUnavailable("nothing to plot: the result holds no timed or load rows")
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax, (kind, shape) in zip(axes.flat, panels):
        if kind == "routing":
            lines = defaultdict(list)
            for r in routing:
                if (r["experts"], r["top_k"]) == shape and r["mode"] == mode:
                    lines[r["method"]].append((r["tokens"], r["us"]))
            _plot_lines(ax, lines, f"routing, {shape[0]} experts top-{shape[1]} ({mode})")
        elif kind == "layer":
            name, experts, top_k = shape
            lines = defaultdict(list)
            lmode = "graph" if any(r["mode"] == "graph" for r in layer) else "eager"
            for r in layer:
                if (r["shape"], r["experts"], r["top_k"]) == shape and r["mode"] == lmode:
                    lines[r["method"]].append((r["tokens"], r["us"]))
            _plot_lines(ax, lines, f"MoE layer, {name} ({lmode})")
        else:
            load = result["load"]
            ranks = max(int(g) for r in load for g in r["max_mean_rank"])
            shapes = sorted({(r["experts"], r["top_k"]) for r in load}, key=lambda s: (s[0] % ranks != 0, -s[0]))
            # the largest router whose experts split evenly over the ranks (SGLang needs that)
            first = (128, 8) if (128, 8) in shapes else shapes[0]
            count = max(r["tokens"] for r in load if (r["experts"], r["top_k"]) == first)
            rows_here = [r for r in load if (r["experts"], r["top_k"]) == first and r["tokens"] == count]
            ranks = max(int(g) for g in rows_here[0]["max_mean_rank"])
            skews = list(dict.fromkeys(r["skew"] for r in rows_here))
            for method in dict.fromkeys(r["method"] for r in rows_here):
                ys = [next(r["max_mean_rank"][str(ranks)] for r in rows_here
                           if r["method"] == method and r["skew"] == s) for s in skews]
                ax.plot(range(len(skews)), ys, marker="o", label=method)
            ax.set_xticks(range(len(skews)))
            ax.set_xticklabels(skews, rotation=20)
            ax.set_title(f"max/mean load over {ranks} EP ranks\n{first[0]} experts top-{first[1]}, {count} tokens")
            ax.set_ylabel("max / mean rank load")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{result['device']} ({result['date']})" + (" - placeholder, not GPU times"
                                                             if result.get("placeholder") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- rich tables

def _fmt_us(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def rich_tables(result: dict) -> list:
    from rich.table import Table

    tables = []
    routing = result["routing"]
    if routing:
        methods = list(dict.fromkeys(r["method"] for r in routing))
        modes = list(dict.fromkeys(r["mode"] for r in routing))
        stat = "median" if result.get("device_kind") == "cuda" else "min"
        t = Table(title=f"Routing time, us ({stat}; {result['device']})")
        for col in ("E/k", "tokens", "mode"):
            t.add_column(col, justify="right")
        for m in methods:
            t.add_column(m, justify="right")
        by = {(r["experts"], r["top_k"], r["tokens"], r["mode"], r["method"]): r for r in routing}
        keys = sorted({(r["experts"], r["top_k"], r["tokens"]) for r in routing})
        for e, k, n in keys:
            for mode in modes:
                cells = []
                for m in methods:
                    r = by.get((e, k, n, mode, m))
                    cells.append("n/a" if r is None or r["us"] is None else _fmt_us(r["us"]))
                t.add_row(f"{e}/{k}", str(n), mode, *cells)
        tables.append(t)
        missing = {(r["method"], r["note"]) for r in routing if r["us"] is None and r.get("note")}
        if missing:
            t.caption = "n/a: " + "; ".join(f"{m}: {note}" for m, note in sorted(missing))[:600]
    layer = result["layer"]
    if layer:
        t = Table(title="MoE layer time, us (router + experts)")
        for col in ("shape", "tokens", "mode", "method", "us", "vs token choice", "backend"):
            t.add_column(col, justify="right")
        base = {(r["shape"], r["tokens"], r["mode"]): r["us"] for r in layer if r["method"] == "token-choice"}
        for r in layer:
            ref = base.get((r["shape"], r["tokens"], r["mode"]))
            ratio = f"{r['us'] / ref:.2f}x" if ref and r["us"] else "-"
            t.add_row(r["shape"], str(r["tokens"]), r["mode"], r["method"], _fmt_us(r["us"]), ratio,
                      str(r.get("moe_backend") or r.get("note") or ""))
        tables.append(t)
    load = result["load"]
    if load:
        ranks = sorted({int(g) for r in load for g in r["max_mean_rank"]} - {1}) or [1]  # one rank: always 1.0
        t = Table(title="Load balance (max/mean; mean over seeds)")
        for col in ("E/k", "tokens", "skew", "method", "expert", *[f"EP{g}" for g in ranks], "slots kept",
                    "gate mass", f"EP{ranks[-1]} slowest rank us"):
            t.add_column(col, justify="right")
        for r in load:
            t.add_row(f"{r['experts']}/{r['top_k']}", str(r["tokens"]), r["skew"], r["method"],
                      f"{r['max_mean_expert']:.2f}",
                      *[f"{r['max_mean_rank'][str(g)]:.2f}" if str(g) in r["max_mean_rank"] else "-" for g in ranks],
                      f"{r['slots_kept']:.1%}", f"{r['gate_mass']:.1%}",
                      _fmt_us(r["slowest_rank_us"].get(str(ranks[-1]))))
        tables.append(t)
    return tables


# ---------------------------------------------------------------- markdown (README's decision guide)

def markdown(result: dict, *, ratio_tokens=(1, 32, 256, 4096), load_ranks=(2, 4, 8)) -> str:
    """The tables of the README's "Measured decision guide", from one result."""
    lines = [f"Measured on **{result['device']}**, {result['date']}, with `{result['command']}`"
             + (" (placeholder: not GPU times)" if result.get("placeholder") else "") + ".", ""]
    routing = [r for r in result["routing"] if r.get("us") is not None]
    if routing:
        mode = "graph" if any(r["mode"] == "graph" for r in routing) else "eager"
        methods = list(dict.fromkeys(r["method"] for r in routing if r["mode"] == mode))
        stat = "median" if result.get("device_kind") == "cuda" else "min"
        lines += [f"**Routing latency** (us, {stat}, {mode}):", "",
                  "| E/k | tokens | " + " | ".join(methods) + " |",
                  "|---|---:|" + "---:|" * len(methods)]
        by = {(r["experts"], r["top_k"], r["tokens"], r["method"]): r["us"] for r in routing if r["mode"] == mode}
        for e, k, n in sorted({(r["experts"], r["top_k"], r["tokens"]) for r in routing}):
            cells = [_fmt_us(by.get((e, k, n, m))) for m in methods]
            lines.append(f"| {e}/{k} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    layer = [r for r in result["layer"] if r.get("us") is not None]
    if layer:
        lines += ["**MoE layer time, expert choice / token choice** (router + fused experts, one GPU, no EP):", "",
                  "| shape | backend | method | " + " | ".join(f"T={t}" for t in ratio_tokens) + " |",
                  "|---|---|---|" + "---:|" * len(ratio_tokens)]
        base = {(r["shape"], r["tokens"]): r["us"] for r in layer if r["method"] == "token-choice"}
        for shape in dict.fromkeys(r["shape"] for r in layer):
            backend = next(r["moe_backend"] for r in layer if r["shape"] == shape)
            for method in ("ec-drop", "ec-topk"):
                cells = []
                for t in ratio_tokens:
                    row = next((r for r in layer if r["shape"] == shape and r["method"] == method
                                and r["tokens"] == t), None)
                    ref = base.get((shape, t))
                    cells.append(f"{row['us'] / ref:.2f}" if row and ref else "-")
                lines.append(f"| {shape} | {backend} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    load = result["load"]
    if load:
        lines += ["**Load balance**, max/mean (expert, and EP rank for " + ", ".join(f"G={g}" for g in load_ranks)
                  + "), slots kept and gate mass retained:", "",
                  "| E/k | tokens | skew | method | expert | " + " | ".join(f"EP{g}" for g in load_ranks)
                  + " | slots kept | gate mass | active experts |",
                  "|---|---:|---|---|---:|" + "---:|" * len(load_ranks) + "---:|---:|---:|"]
        for r in load:
            cells = [f"{r['max_mean_rank'][str(g)]:.2f}" if str(g) in r["max_mean_rank"] else "-" for g in load_ranks]
            lines.append(f"| {r['experts']}/{r['top_k']} | {r['tokens']} | {r['skew']} | {r['method']} | "
                         f"{r['max_mean_expert']:.2f} | " + " | ".join(cells)
                         + f" | {r['slots_kept']:.1%} | {r['gate_mass']:.1%} | {r.get('active_experts', 0):.0f} |")
        lines.append("")
    return "\n".join(lines)
