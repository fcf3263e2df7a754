"""`effai benchmark` with its default, relative --out (effai_benchmark/): every artifact it exported is timed
(bench records absolute paths; a relative folder once matched none of them and every row said 'not measured')."""

from __future__ import annotations

import shutil
from pathlib import Path


def test_benchmark_times_artifacts_given_by_relative_paths(digits_exports, tmp_path, monkeypatch):
    from effai import console
    from effai.cli.benchmark import _time

    monkeypatch.chdir(tmp_path)
    rel = Path("effai_benchmark") / "ghostnetv3_050.digits-onnx"
    shutil.copytree(digits_exports["onnx"].out_dir, rel)
    row: dict = {"target": "onnx", "precision": "fp32"}
    _time([(row, rel)], threads=1, runs=2, out=Path("effai_benchmark"), ui=console.err(), as_json=True)
    assert row["status"] == "timed", row
    assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["runtime"]
