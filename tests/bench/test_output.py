"""CSV, markdown and plot output of a bench result."""

import builtins
import csv
import io

import pytest

from sgl_ecpatch.bench import output

from bench_fixtures import make_table


def _result():
    table = make_table(lambda t: 2.0 * t)
    table["layer"] = [
        {"shape": "qwen3-30b-a3b", "hidden": 2048, "inter": 768, "experts": 128, "top_k": 8, "tokens": t,
         "method": m, "mode": "graph", "us": us, "moe_backend": "torch-grouped-mm", "router": "x", "note": None}
        for t in (1, 32) for m, us in (("token-choice", 100.0), ("ec-drop", 150.0), ("ec-topk", 120.0))]
    table["load"] = [{"experts": 128, "top_k": 8, "tokens": 64, "skew": "uniform", "method": "token-choice",
                      "capacity_factor": None, "seeds": 1, "slots_kept": 1.0, "gate_mass": 1.0,
                      "max_mean_expert": 2.0, "max_expert_load": 8, "active_experts": 120,
                      "max_mean_rank": {"1": 1.0, "8": 1.5}, "slowest_rank_us": {"1": 10.0, "8": 3.0},
                      "slowest_rank_us_equal_work": {"1": 10.0, "8": 3.0}, "even_split": {"1": True, "8": True}}]
    return table


def test_csv_is_long_format_with_every_number():
    rows = list(csv.DictReader(io.StringIO(output.to_csv(_result()))))
    routing = [r for r in rows if r["section"] == "routing"]
    assert len(routing) == 16 and {r["metric"] for r in routing} == {"us"}
    assert next(r for r in routing if r["tokens"] == "4" and r["method"] == "ec-torch-drop")["value"] == "8.0"
    layer = [r for r in rows if r["section"] == "layer"]
    assert len(layer) == 6 and layer[0]["note"] == "torch-grouped-mm"
    load = {(r["metric"], r["ep_ranks"]): r["value"] for r in rows if r["section"] == "load"}
    assert load[("max_mean_rank", "8")] == "1.5" and load[("active_experts", "")] == "120"


def test_markdown_has_the_guide_tables():
    text = output.markdown(_result())
    assert "Measured on **Fixture GPU**" in text
    assert "| 128/8 | 4 | 5.0 | 8.0 |" in text  # routing row: topk 5 us, ec 2*4 us
    assert "| qwen3-30b-a3b | torch-grouped-mm | ec-drop | 1.50 | 1.50 | - | - |" in text
    assert "| 128/8 | 64 | uniform | token-choice | 2.00 | - | - | 1.50 | 100.0% | 100.0% | 120 |" in text


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(output.PlotUnavailable, match=r"pip install 'sgl-ecpatch\[plot\]'"):
        output.plot(_result(), tmp_path / "x.png")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    output.plot(_result(), tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
