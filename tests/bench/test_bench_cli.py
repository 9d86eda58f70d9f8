"""`ecpatch bench` and `ecpatch advise` through typer's CliRunner: exit codes, stdout vs stderr."""

import json

import pytest
import typer
from typer.testing import CliRunner

from sgl_ecpatch.bench import table as table_mod
from sgl_ecpatch.commands.bench import register

from bench_fixtures import make_table, needs_runtime


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


def invoke(app, *args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("args,message", [
    (["advise", "--model", "nope", "--tokens", "5"], "unknown --model 'nope'"),
    (["advise", "--model", "qwen3-moe", "--experts", "8", "--top-k", "2", "--tokens", "5"], "not both"),
    (["advise", "--experts", "8", "--tokens", "5"], "both --experts and --top-k"),
    (["advise", "--experts", "8", "--top-k", "9", "--tokens", "5"], "--top-k must be in [1, 8]"),
    (["advise", "--model", "qwen3-moe"], "--tokens N is required"),
    (["advise", "--model", "qwen3-moe", "--tokens", "5", "--skew", "gauss"], "bad skew"),
    (["advise", "--model", "qwen3-moe", "--tokens", "5", "--capacity-factor", "0"], "--capacity-factor"),
    (["advise", "--model", "qwen3-moe", "--tokens", "5", "--table", "/nonexistent.json"], "cannot read"),
    (["bench", "--methods", "topk,magic"], "unknown --methods magic"),
    (["bench", "--model", "nope"], "unknown --model"),
    (["bench", "--tokens", "1,x"], "comma-separated integers"),
    (["bench", "--json", "--csv", "-"], "pick one"),
    (["bench", "--skews", "zipf"], "needs a value"),
    (["bench", "--threads", "0"], "--threads must be >= 1"),
    (["advise", "--model", "mixtral", "--tokens", "5", "--layers", "3-1"], "3-1"),
    (["advise", "--model", "mixtral", "--tokens", "0"], "--tokens must be >= 1"),
    (["advise", "--model", "mixtral", "--tokens", "5", "--ep-ranks", "16"], "--ep-ranks must be in [1, 8]"),
    (["advise", "--model", "mixtral", "--tokens", "5", "--scenario", "batch"], "--scenario must be one of"),
])
def test_usage_errors_exit_2_with_one_line_on_stderr(app, args, message):
    result = invoke(app, *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert result.stdout == ""


@needs_runtime
def test_advise_keep_off_json(app, tmp_path):
    path = table_mod.save(make_table(lambda t: 1e6), tmp_path / "t.json")
    result = invoke(app, "advise", "--model", "qwen3-moe", "--tokens", "64", "--table", str(path), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verdict"] == "keep-off" and data["command"] is None
    assert data["table"]["device"] == "Fixture GPU"
    assert [p["tokens"] for p in data["points"]] == [1, 4, 16, 64]


@needs_runtime
def test_advise_prints_verdict_reasons_and_command(app, tmp_path):
    path = table_mod.save(make_table(lambda t: 5.0), tmp_path / "t.json")
    result = invoke(app, "advise", "--model", "qwen3-moe", "--tokens", "4096", "--ep-ranks", "8", "--skew",
                    "zipf-0.5", "--scenario", "offline", "--table", str(path), "--sglang-root", "/s")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("ENABLE")
    assert "ecpatch enable /s/srt/models/qwen3_moe.py" in result.stdout
    assert "Fixture GPU" in result.stdout


@needs_runtime
def test_bench_tiny_cpu_run_json_csv_plot_and_table(app, tmp_path):
    pytest.importorskip("matplotlib")
    csv_path, png, saved = tmp_path / "b.csv", tmp_path / "b.png", tmp_path / "table.json"
    result = invoke(app, "bench", "--experts", "16", "--top-k", "2", "--tokens", "1,8", "--device", "cpu",
                    "--methods", "topk,ec-torch-drop,ec-cuda-drop", "--skews", "uniform,zipf-1",
                    "--ep-ranks", "1,4", "--load-tokens", "64", "--seeds", "1", "--quick", "--json",
                    "--csv", str(csv_path), "--plot", str(png), "--save-table", str(saved))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["placeholder"] is True and data["device_kind"] == "cpu"
    assert "not GPU times" in result.stderr
    timed = {(r["method"], r["tokens"]) for r in data["routing"] if r["us"] is not None}
    assert timed == {("topk", 1), ("topk", 8), ("ec-torch-drop", 1), ("ec-torch-drop", 8)}
    cuda = [r for r in data["routing"] if r["method"] == "ec-cuda-drop"]
    assert cuda and all(r["us"] is None and "CUDA" in r["note"] for r in cuda)
    load = {(r["skew"], r["method"]): r for r in data["load"]}
    assert set(load) == {(s, m) for s in ("uniform", "zipf-1") for m in ("token-choice", "ec-drop", "ec-topk")}
    # the expert-choice load bound: C = ceil(64 * 2 * 1.25 / 16) = 10 per expert, max/mean <= 10 / 8
    assert load[("zipf-1", "ec-drop")]["max_expert_load"] <= 10
    assert load[("zipf-1", "token-choice")]["max_mean_expert"] > load[("zipf-1", "ec-drop")]["max_mean_expert"]
    assert csv_path.read_text().startswith("section,experts,top_k,tokens,method")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table_mod.load(saved)["routing"] == data["routing"]


def test_registered_in_the_ecpatch_app():
    from sgl_ecpatch.cli import app as ecpatch_app

    for command in ("bench", "advise"):
        result = CliRunner().invoke(ecpatch_app, [command, "--help"])
        assert result.exit_code == 0, result.stderr
        assert "--json" in result.stdout


@needs_runtime
def test_advise_measure_here_names_this_machine(app):
    result = invoke(app, "advise", "--experts", "16", "--top-k", "2", "--tokens", "16", "--measure", "--json",
                    "--sglang-root", "/s")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["table"]["device"].startswith("cpu") and data["table"]["placeholder"] is True
    assert data["table"]["command"].startswith("ecpatch advise --measure")
    assert data["used"]["routing_shape"] == [16, 2]  # measured for this very shape
    assert data["verdict"] in ("enable", "enable-with-options", "keep-off")
    assert "CPU times, not GPU times" in result.stderr


@needs_runtime
def test_bench_records_the_command_that_reproduces_it(app):
    result = invoke(app, "bench", "--experts", "8", "--top-k", "2", "--tokens", "4", "--parts", "routing",
                    "--methods", "topk", "--device", "cpu", "--quick", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["command"] == (
        "ecpatch bench --experts 8 --top-k 2 --tokens 4 --methods topk --parts routing --device cpu --quick --json")
