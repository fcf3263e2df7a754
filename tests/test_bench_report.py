"""Bench reports, plots and the regression gate, on BenchRecords built by hand (no runtime or device needed).

The records carry realistic raw samples (seeded normal jitter around a median), so the noise-aware gate, the
table and the plot work on the same kind of data a real run produces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from effai.device_bench import baseline, report
from effai.device_bench.base import REPORT_SCHEMA, BenchRecord
from effai.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def make_record(model="ghostnetv3_050.digits", target="tflite", precision="int8", device="host", threads=2,
                median=4.10, jitter=0.05, n=100, seed=0, energy_j=None, status="ok", error="",
                first=8.3, load=12.5, extra=None) -> BenchRecord:
    rng = np.random.default_rng(seed)
    samples = [] if status != "ok" and n == 0 else list(np.round(median + jitter * rng.standard_normal(n), 4))
    xs = np.array(samples) if samples else np.array([np.nan])
    stats = {"median": float(np.median(xs)), "p90": float(np.percentile(xs, 90)),
             "p99": float(np.percentile(xs, 99)), "mean": float(xs.mean()), "std": float(xs.std()),
             "min": float(xs.min()), "max": float(xs.max()), "trimmed_mean": float(xs.mean()), "n": len(samples)}
    if energy_j is None:
        energy = {"meter": "auto", "available": False,
                  "reason": "unavailable: rapl: no /sys/class/powercap; jetson: no ina3221 hwmon"}
    else:
        energy = {"meter": "rapl", "available": True, "reason": "", "joules_per_inference": energy_j,
                  "mean_watts": energy_j / (median / 1e3), "raw_joules_per_inference": energy_j * 1.4,
                  "raw_mean_watts": 1.4 * energy_j / (median / 1e3), "idle_watts": 3.0, "sample_period_s": 0.1,
                  "samples": 40, "caveats": []}
    return BenchRecord(
        artifact={"path": f"/tmp/{model}-{target}-{precision}", "model": model, "target": target,
                  "precision": precision, "model_file": "model." + target, "manifest_sha256": "ab" * 32},
        device={"name": device, "cores": 2}, runtime="litert" if target == "tflite" else target,
        runtime_version="2.3.0", threads=threads, warmup=10, runs=len(samples), load_ms=load, first_ms=first,
        stats=stats, samples_ms=samples, throttling={"verdict": "none", "reasons": [], "drift": 1.01},
        energy=energy, effai_version="0.1.0", created_at="2026-11-30T10:00:00Z", status=status, error=error,
        extra=extra or {})


# ------------------------------------------------------------------------------------------------------- report

def test_append_and_reload_equals(tmp_path):
    path = tmp_path / "bench.json"
    recs = [make_record(threads=1, seed=1), make_record(target="onnx", precision="fp32", energy_j=0.0123, seed=2)]
    w = report.ReportWriter(path, {"command": ["effai", "bench", "a"], "config": {"runs": 100}})
    assert not w.appended
    for r in recs:
        w.append(r)
    w.finish("complete")
    header, back = report.load(path)
    assert back == recs
    assert header["status"] == "complete" and header["schema"] == REPORT_SCHEMA
    assert header["meta"]["command"] == ["effai", "bench", "a"]
    assert "crashed" not in header
    doc = json.loads(path.read_text())
    assert doc["records"][0]["samples_ms"] == recs[0].samples_ms   # raw samples stored


def test_valid_json_after_each_append_and_crash_reads_as_interrupted(tmp_path):
    """A real crash: a child process appends two records and dies (os._exit) without finish()."""
    path = tmp_path / "bench.json"
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_bench_report import make_record
        from effai.device_bench.report import ReportWriter
        path = {str(path)!r}
        w = ReportWriter(path, {{"command": ["x"]}})
        assert json.load(open(path))["records"] == []
        for i in range(2):
            w.append(make_record(threads=i + 1, seed=i))
            assert len(json.load(open(path))["records"]) == i + 1
        os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 9, proc.stderr
    assert json.loads(path.read_text())["status"] == "running"
    header, recs = report.load(path)
    assert header["status"] == "interrupted" and header["crashed"] is True
    assert [r.threads for r in recs] == [1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name != "bench.json"]   # no temp files left


def test_interrupted_status_is_kept(tmp_path):
    path = tmp_path / "r.json"
    w = report.ReportWriter(path, {})
    w.append(make_record())
    w.finish("interrupted")
    header, recs = report.load(path)
    assert header["status"] == "interrupted" and "crashed" not in header and len(recs) == 1
    with pytest.raises(ValueError):
        w.finish("done")


def test_failed_replace_leaves_previous_report_intact(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    w = report.ReportWriter(path, {})
    w.append(make_record(threads=1))
    before = path.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    import os

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UsageError, match=f"cannot write the bench report {path}: disk full; choose another --out"):
        w.append(make_record(threads=2))
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()    # not mkstemp's 0600: others may read a report


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_existing_report_is_appended_to(tmp_path):
    path = tmp_path / "r.json"
    w1 = report.ReportWriter(path, {"command": ["first"]})
    w1.append(make_record(threads=1))
    w1.finish()
    w2 = report.ReportWriter(path, {"command": ["second"]})
    assert w2.appended and "appending to the existing report" in w2.notice and "1 earlier record" in w2.notice
    w2.append(make_record(threads=4))
    w2.finish()
    header, recs = report.load(path)
    assert [r.threads for r in recs] == [1, 4]
    assert [s["meta"]["command"] for s in header["sessions"]] == [["first"], ["second"]]
    assert header["meta"]["command"] == ["second"]


def test_non_effai_json_and_garbage_are_refused(tmp_path):
    other = tmp_path / "package.json"
    other.write_text('{"name": "left-pad"}')
    with pytest.raises(UsageError, match=r"package.json is not an effai bench report; choose another --out"):
        report.ReportWriter(other, {})
    assert other.read_text() == '{"name": "left-pad"}'     # not overwritten
    garbage = tmp_path / "g.json"
    garbage.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        report.load(garbage)
    with pytest.raises(UsageError, match="does not exist"):
        report.load(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="is not an effai bench report"):
        report.load(other)


def test_newer_and_older_schema(tmp_path):
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema": "effai.bench/2", "status": "complete", "records": []}))
    msg = "written by a newer effai (effai.bench/2); upgrade effai: pip install -U effai"
    with pytest.raises(UsageError) as e:
        report.load(newer)
    assert msg in str(e.value) and e.value.exit_code == 2
    with pytest.raises(UsageError, match=r"newer effai"):
        report.ReportWriter(newer, {})
    older = tmp_path / "older.json"
    older.write_text(json.dumps({"schema": "effai.bench/0", "records": []}))
    with pytest.raises(UsageError, match=r"pre-release schema effai.bench/0 .* re-run effai bench"):
        report.load(older)


def test_damaged_record_is_named(tmp_path):
    path = tmp_path / "r.json"
    w = report.ReportWriter(path, {})
    w.append(make_record())
    doc = json.loads(path.read_text())
    del doc["records"][0]["threads"]
    path.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=r"records\[0\] lacks threads"):
        report.load(path)


def test_nan_is_written_as_null_and_json_stays_strict(tmp_path):
    path = tmp_path / "r.json"
    rec = make_record()
    rec.stats["std"] = float("nan")
    w = report.ReportWriter(path, {"config": {"min_seconds": float("inf")}})
    w.append(rec)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    _, [back] = report.load(path)
    assert back.stats["std"] is None


def test_table_shows_numbers_energy_and_status():
    from rich.console import Console

    recs = [make_record(median=4.10, jitter=0.0, first=8.3, load=12.5),
            make_record(target="onnx", precision="fp32", median=41.2, jitter=0.0, energy_j=0.0123, threads=4),
            make_record(target="executorch", precision="int8", status="error", n=0,
                        error="device disconnected mid-run", extra={"incomplete": True})]
    console = Console(record=True, width=220)
    console.print(report.table(recs))
    text = console.export_text()
    for needle in ("ghostnetv3_050.digits tflite int8", "host", "4.10", "8.30", "12.5", "41.2", "12.3 mJ/inf",
                   "unavailable: rapl: no", "none (drift 1.01)",
                   "error: device disconnected mid-run", "litert 2.3.0"):
        assert needle in text, needle


# --------------------------------------------------------------------------------------------------------- plot

@pytest.mark.parametrize("with_energy", [False, True])
def test_plot_writes_png(tmp_path, with_energy):
    recs = [make_record(threads=1, median=4.1, energy_j=0.012 if with_energy else None),
            make_record(target="onnx", precision="fp32", threads=2, median=6.5, seed=3),
            make_record(target="executorch", status="error", n=0, error="runner crashed")]
    from effai.device_bench.plot import plot

    out = tmp_path / "plots" / "bench.png"
    assert plot(recs, out) == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == (13 if with_energy else 10) * 110 and height > 300
    assert [p.name for p in out.parent.iterdir()] == ["bench.png"]


def test_plot_log_scale_when_medians_differ_widely(tmp_path):
    from effai.device_bench.plot import plot

    out = plot([make_record(median=0.5, jitter=0.01), make_record(device="ssh:pi@rpi", median=80.0)],
               tmp_path / "b.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        plot([], tmp_path / "c.png")


# ----------------------------------------------------------------------------------------------------- baseline

def test_parse_fail_on_good():
    rules = baseline.parse_fail_on("latency:+5%,energy:+5%,p90:+10%,first:+20%,load:+50%")
    assert [(r.metric, r.threshold_pct, r.strict) for r in rules] == [
        ("latency", 5.0, False), ("energy", 5.0, False), ("p90", 10.0, False), ("first", 20.0, False),
        ("load", 50.0, False)]
    assert baseline.parse_fail_on(" latency:2.5%! ") == (baseline.Rule("latency", 2.5, True),)
    assert str(baseline.parse_fail_on("latency:+2.5%!")[0]) == "latency:+2.5%!"
    assert baseline.parse_fail_on(baseline.DEFAULT_FAIL_ON)


@pytest.mark.parametrize("text, needle", [
    ("latency:5", "bad --fail-on rule 'latency:5'"),
    ("latency:-5%", "bad --fail-on rule"),
    ("speed:+5%", "unknown --fail-on metric 'speed'"),
    ("latency:+5%,,energy:+5%", "empty rule"),
    ("", "--fail-on is empty"),
    ("latency:+5%,latency:+9%", "twice"),
])
def test_parse_fail_on_bad(text, needle):
    with pytest.raises(UsageError) as e:
        baseline.parse_fail_on(text)
    msg = str(e.value)
    assert needle in msg
    if "twice" not in needle:
        assert "latency, p90, p99, energy, first, load" in msg and "METRIC:+N%" in msg


def test_compare_detects_clear_latency_regression():
    base = [make_record(median=4.10, seed=1)]
    cur = [make_record(median=4.52, seed=2)]
    cmp = baseline.compare(cur, base, baseline.parse_fail_on("latency:+5%"))
    assert not cmp.ok and len(cmp.regressions) == 1
    row = cmp.regressions[0]
    assert row.metric == "latency" and row.verdict == "regression" and 9.0 < row.change_pct < 11.5
    text = cmp.render()
    assert "ghostnetv3_050.digits tflite int8 @ host x2: latency 4.1" in text
    assert "-> 4.5" in text and "> +5%) REGRESSION" in text and "spread p90-p10" in text
    assert text.splitlines()[-1].startswith("1 regression against the baseline")


def test_compare_passes_within_threshold_and_reports_improvement():
    base = [make_record(median=4.10, seed=1), make_record(threads=4, median=3.0, seed=3)]
    cur = [make_record(median=4.20, seed=2), make_record(threads=4, median=2.5, seed=4)]
    cmp = baseline.compare(cur, base, baseline.parse_fail_on("latency:+5%"))
    assert cmp.ok and cmp.regressions == []
    assert [r.verdict for r in cmp.rows] == ["ok", "improved"]
    assert "<= +5%) ok" in cmp.render()


def test_noise_hides_jitter_but_strict_rule_fails():
    """A +8% median shift over 10 very noisy samples: not separable from noise; strict (!) fails anyway."""
    base = [make_record(median=4.0, jitter=1.0, n=10, seed=5)]
    cur = [make_record(median=4.0, jitter=1.0, n=10, seed=5)]
    cur[0].stats["median"] = base[0].stats["median"] * 1.08
    cur[0].samples_ms[:] = [x * 1.08 for x in cur[0].samples_ms]
    soft = baseline.compare(cur, base, baseline.parse_fail_on("latency:+5%"))
    assert soft.ok and soft.rows[0].verdict == "within-noise"
    assert "within noise" in soft.render() and "95% intervals overlap" in soft.render()
    strict = baseline.compare(cur, base, baseline.parse_fail_on("latency:+5%!"))
    assert not strict.ok and strict.rows[0].verdict == "regression"


def test_energy_unavailable_is_not_a_failure_but_energy_regression_is():
    base = [make_record(seed=1), make_record(threads=4, seed=2, energy_j=0.010)]
    cur = [make_record(seed=3, energy_j=0.011), make_record(threads=4, seed=4, energy_j=0.0112)]
    cmp = baseline.compare(cur, base, baseline.parse_fail_on("latency:+5%,energy:+5%"))
    verdicts = {(r.key[4], r.metric): r.verdict for r in cmp.rows}
    assert verdicts == {(2, "latency"): "ok", (2, "energy"): "not-compared",
                        (4, "latency"): "ok", (4, "energy"): "regression"}
    text = cmp.render()
    assert "@ host x2: energy not compared: baseline: unavailable: rapl: no /sys/class/powercap" in text
    assert "@ host x4: energy 10 mJ -> 11.2 mJ/inf (+12.0% > +5%) REGRESSION" in text


def test_both_sides_unavailable_names_the_reason_once():
    cmp = baseline.compare([make_record(seed=1)], [make_record(seed=2)], baseline.parse_fail_on("energy:+5%"))
    assert cmp.ok and cmp.rows[0].verdict == "not-compared"
    assert cmp.rows[0].line().endswith(
        "energy not compared: unavailable: rapl: no /sys/class/powercap; jetson: no ina3221 hwmon (both runs)")


def test_failed_record_round_trips_with_nan_times(tmp_path):
    rec = make_record(status="error", n=0, error="runner crashed")
    rec.load_ms = rec.first_ms = float("nan")
    w = report.ReportWriter(tmp_path / "r.json", {})
    w.append(rec)
    w.finish()
    [back] = report.load(tmp_path / "r.json")[1]
    assert back.status == "error" and back.samples_ms == [] and np.isnan(back.load_ms) and np.isnan(back.first_ms)
    assert back.stats["median"] is None


def test_new_missing_and_failed_records():
    base = [make_record(threads=1), make_record(threads=2), make_record(target="onnx", precision="fp32")]
    cur = [make_record(threads=2), make_record(threads=8),
           make_record(target="onnx", precision="fp32", status="error", n=0, error="device offline")]
    cmp = baseline.compare(cur, base, baseline.parse_fail_on("latency:+5%"))
    by = {r.verdict: r for r in cmp.rows}
    assert set(by) == {"ok", "new", "missing", "failed"}
    assert by["new"].key[4] == 8 and by["missing"].key[4] == 1
    assert [r.verdict for r in cmp.regressions] == ["failed"]
    text = cmp.render()
    assert "@ host x8: new (not in the baseline)" in text
    assert "@ host x1: missing (in the baseline, not in this run)" in text
    assert "onnx fp32 @ host x2: FAILED (this run failed: device offline)" in text
    assert "1 new, 1 missing" in text
    assert cmp.to_dict()["ok"] is False and json.dumps(cmp.to_dict())


def test_last_duplicate_key_wins_and_other_metrics():
    base = [make_record(median=9.0), make_record(median=4.0, first=10.0, load=20.0)]  # appended report
    cur = [make_record(median=4.05, first=13.0, load=21.0)]
    cmp = baseline.compare(cur, base, baseline.parse_fail_on("latency:+5%,first:+20%,load:+50%,p90:+10%"))
    assert {r.metric: r.verdict for r in cmp.rows} == {"latency": "ok", "first": "regression", "load": "ok",
                                                       "p90": "ok"}
    assert "first inference 10.00 -> 13.00 ms (+30.0% > +20%) REGRESSION" in cmp.render()
    with pytest.raises(UsageError):
        baseline.compare(cur, base, ())


def test_compare_reads_reports_written_by_the_writer(tmp_path):
    """The gate as the CLI uses it: both sides loaded from report files."""
    for name, med in (("base.json", 4.10), ("cur.json", 4.60)):
        w = report.ReportWriter(tmp_path / name, {})
        w.append(make_record(median=med, seed=int(med * 10)))
        w.finish()
    cmp = baseline.compare(report.load(tmp_path / "cur.json")[1], report.load(tmp_path / "base.json")[1],
                           baseline.parse_fail_on("latency:+5%"))
    assert not cmp.ok and "REGRESSION" in cmp.render()


def test_quantile_interval_brackets_the_median():
    xs = list(np.random.default_rng(0).normal(10.0, 1.0, 100))
    lo, hi = baseline.quantile_interval(xs, 0.5)
    s = sorted(xs)
    assert (lo, hi) == (s[40], s[59]) and lo < np.median(xs) < hi
    assert baseline.quantile_interval(xs[:4], 0.5) is None


def test_modules_import_without_torch_matplotlib_or_rich():
    code = ("import sys, effai.device_bench.report, effai.device_bench.plot, effai.device_bench.baseline; "
            "bad = [m for m in ('torch', 'matplotlib', 'rich') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_deeply_nested_report_is_a_usage_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UsageError, match="nested too deeply to be an effai bench report"):
        report.load(path)
    with pytest.raises(UsageError, match="nested too deeply"):
        report.ReportWriter(path, {})
