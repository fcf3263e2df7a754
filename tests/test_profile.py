"""effai bench --profile: per-operator profiles of the digits model in every host runtime (ExecuTorch ETDump,
LiteRT operator isolation, onnxruntime's trace), their shares and module names, the report/plot, and clean refusals."""

from __future__ import annotations

import json

import pytest

from effai.device_bench import artifact as artifact_mod
from effai.device_bench.profile import PROFILERS, profile_artifact, tflite
from effai.errors import UsageError
from tests.helpers import run_cli

PEAK = {"gflops": 50.0, "method": "fixed for the test"}


@pytest.mark.parametrize("target", ["executorch", "tflite", "onnx"])
def test_profile_rows_shares_and_roofline(digits_exports, target):
    art = artifact_mod.load(digits_exports[target].out_dir)
    prof = profile_artifact(art, threads=1, runs=3, warmup=1, peak=PEAK)
    assert len(prof.rows) > 20                                   # operators, not one row for the whole model
    assert all(r.time_ms >= 0 for r in prof.rows)
    assert prof.total_ms > 0
    assert sum(r.share for r in prof.rows) == pytest.approx(1.0, abs=1e-6)
    assert prof.roofline["measured_ms"] == pytest.approx(prof.total_ms)
    assert prof.roofline["weight_bytes"] > 1_000_000             # GhostNetV3-0.5: ~1.6 M float weights
    if target == "executorch":
        kinds = {r.kind for r in prof.rows}
        assert any(k.startswith("Convolution") for k in kinds), kinds   # XNNPACK's own per-operator events
    else:
        flops = prof.flops
        assert flops and 5e6 < flops < 5e7                      # the digits model at 64x64: ~9.5 MFLOP
        assert prof.roofline["fraction_of_peak"] > 0
        convs = [r for r in prof.rows if r.flops]
        assert convs and all(r.gflops and r.gflops > 0 for r in convs if r.time_ms > 0)
    if target == "tflite":                                       # litert-torch's scoped tensor names -> modules
        assert prof.mapped > 0.9 * len(prof.rows)
        assert any(r.module.startswith("blocks.") and r.kind == "CONV_2D" for r in prof.rows)


def test_tflite_module_names_parsed():
    name = ("effai.zoo.ghostnetv3.GhostNetV3/torch.nn.modules.container.Sequential_blocks/"
            "torch.nn.modules.container.Sequential_1/effai.zoo.ghostnetv3.GhostBottleneck_0/"
            "torch.nn.modules.conv.Conv2d_conv_dw;3")
    assert tflite.module_name(name) == "blocks.1.0.conv_dw"
    assert tflite.module_name("serving_default_input:0") == ""


def test_cli_profile_writes_report_and_plot(digits_exports, tmp_path):
    out = tmp_path / "bench.json"
    code, summary, stdout, stderr = run_cli("bench", str(digits_exports["tflite"].out_dir),
                                            str(digits_exports["onnx"].out_dir), "--runs", "3", "--warmup", "1",
                                            "--cooldown", "0", "--idle", "0", "--profile", "--profile-runs", "3",
                                            "--out", str(out), env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert code == 0, stderr[-2000:]
    assert "top 15 of" in stdout and "roofline:" in stderr
    doc = json.loads(out.read_text())
    profiles = [r["extra"]["profile"] for r in doc["records"]]
    assert [p["target"] for p in profiles] == ["tflite", "onnx"]
    assert all(p["rows"] and abs(sum(r["share"] for r in p["rows"]) - 1) < 1e-6 for p in profiles)
    assert all(p["roofline"]["peak_gflops"] > 0 for p in profiles)   # the host's matmul peak, measured and cached
    assert (tmp_path / "cache" / "effai" / "peak.json").is_file()
    assert (tmp_path / "bench.profile.png").stat().st_size > 10_000
    assert len(summary["profiles"]) == 2 and summary["profiles"][0]["top"]


def test_cli_profile_refuses_coreml_on_linux_before_timing(digits_exports, tmp_path):
    import sys

    if sys.platform == "darwin":
        pytest.skip("Core ML runs on macOS")
    out = tmp_path / "bench.json"
    code, summary, stdout, stderr = run_cli("bench", str(digits_exports["coreml"].out_dir), "--profile", "--out",
                                            str(out))
    assert code != 0
    assert "Traceback" not in stderr
    assert "Core ML" in summary["error"] and "macOS" in summary["error"]
    assert not out.exists()                                      # refused before any timing or report


def test_profile_refuses_remote_device_and_unknown_target(tmp_path):
    from effai.cli.bench import precheck_profile
    from effai.device_bench.profile import check

    with pytest.raises(UsageError, match="host only"):
        precheck_profile([tmp_path], "adb:R5CT1234", 20)
    with pytest.raises(UsageError, match="no profiler"):
        check("tensorrt", "model.plan")
    assert {"executorch", "tflite", "onnx", "coreml"} <= set(PROFILERS)
