"""Benchmark rows, table and plot; `effitune export` and `effitune benchmark` through the real CLI app."""
from __future__ import annotations

import json

import pytest
from test_onnx import copy_run, exported_run, reuse_graph  # noqa: F401 - fixtures
from typer.testing import CliRunner

from effitune import bundle as bundles
from effitune.cli import app
from effitune.errors import UserError
from effitune.export.bench import benchmark, save, table

runner = CliRunner()
FAST = {"runs": 3, "warmup": 1, "batch_size": 4}


def test_benchmark_rows_table_and_plot(exported_run, tmp_path):
    rows = benchmark([exported_run], **FAST)
    assert [row["backend"] for row in rows] == ["torch", "onnx"]
    for row in rows:
        assert row["latency_p95_ms"] >= row["latency_p50_ms"] > 0 and row["throughput_ips"] > 0
        assert row["accuracy"] == 0.4 and row["bytes"] > 1e6 and row["batch_size"] == 4
    assert table(rows).row_count == 2
    written = save(rows, tmp_path / "bench")
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(written["json"].read_text()) == rows


def test_cli_export_int8_then_benchmark(exported_run, reuse_graph, tmp_path):
    bundle = copy_run(exported_run, tmp_path / "run")
    result = runner.invoke(app, ["export", str(bundle), "--format", "onnx", "--int8", "--json"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported["onnx"]["parity"]["passed"] and exported["int8"]["accuracy_images"] == 9
    assert bundles.read_meta(bundle)["export"]["int8"]["bytes"] == (bundle / "model.int8.onnx").stat().st_size

    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", str(bundle), "--json", "--out", str(out), "--runs", "3",
                                 "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["backend"] for row in rows] == ["torch", "onnx", "int8"]
    assert rows[2]["accuracy"] == exported["int8"]["accuracy"] and rows[2]["bytes"] < rows[1]["bytes"]
    assert (out / "benchmark.png").is_file() and (out / "benchmark.json").is_file()


def test_cli_refuses_unknown_format_and_missing_bundle(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "--format", "coreml"])
    assert result.exit_code == 2 and "Unknown export format 'coreml'. Choose one of: onnx, openvino, tflite" \
        in result.output
    result = runner.invoke(app, ["benchmark", str(tmp_path / "nowhere"), "--json"])
    assert result.exit_code == 2 and "does not exist. Pass the model bundle folder" in result.output


def test_runs_and_batch_size_below_one_are_refused(tmp_path):
    for option in ("--runs", "--batch-size"):
        result = runner.invoke(app, ["benchmark", str(tmp_path), option, "0"])
        assert result.exit_code == 2 and "Traceback" not in result.output
    with pytest.raises(UserError, match="at least 1"):
        benchmark([tmp_path], runs=0)
