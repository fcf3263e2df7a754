"""perf.json: bench records appended to a bundle, card and index regenerated, stale signature dropped or re-signed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from effai.bundle import index as index_mod
from effai.bundle import perf, sign
from effai.device_bench.base import BenchRecord
from effai.errors import EffaiError, UsageError
from tests.test_bundle_sign import flip_byte, make_bundle

PI = {"name": "ssh:pi@192.168.1.20", "transport": "ssh", "host": "192.168.1.20", "user": "pi",
      "model": "Raspberry Pi 5 Model B Rev 1.0", "cpu": "Cortex-A76", "machine": "aarch64",
      "os": "Debian GNU/Linux 12 (bookworm)", "cores": 4}
PHONE = {"name": "adb:R5CT1234ABC", "transport": "adb", "serial": "R5CT1234ABC", "model": "samsung SM-S918B",
         "soc": "Qualcomm SM8550", "os": "Android 14 (API 34)"}
DESKTOP = {"name": "host", "model": "ASUS System Product Name", "cpu": "AMD Ryzen 9 7950X 16-Core Processor",
           "cores": 16, "machine": "x86_64", "os": "Ubuntu 24.04 LTS"}


def manifest_sha(root: Path, art_dir: str) -> str:
    return hashlib.sha256((root / art_dir / "manifest.json").read_bytes()).hexdigest()


def rec(root: Path | None, target: str, precision: str, device: dict, median: float, threads: int = 1,
        status: str = "ok", energy: float | None = None, model: str = "tinynet.digits", sha: str | None = None,
        created_at: str = "2026-11-29T10:00:00.000000Z") -> BenchRecord:
    art_dir = f"{target}-{precision}"
    digest = sha if sha is not None else manifest_sha(root, art_dir)
    return BenchRecord(
        artifact={"path": f"/somewhere/{art_dir}", "model": model, "target": target, "precision": precision,
                  "model_file": "m", "manifest_sha256": digest},
        device=device, runtime="onnxruntime" if target == "onnx" else "litert", runtime_version="1.2.3",
        threads=threads, warmup=2, runs=50, load_ms=5.0, first_ms=2.0,
        stats={"median": median, "p90": median * 1.1, "p99": median * 1.3, "mean": median, "std": 0.1,
               "min": median * 0.9, "max": median * 1.5, "trimmed_mean": median},
        samples_ms=[median] * 50, throttling={"verdict": "none"},
        energy={"available": energy is not None, "joules_per_inference": energy, "reason": "" if energy else "none"},
        effai_version="0.1.0", created_at=created_at, status=status, error="" if status == "ok" else "it broke")


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return sign.keygen(tmp_path_factory.mktemp("key") / "signer.key")


@pytest.fixture
def bundle(tmp_path, key):
    root = make_bundle(tmp_path / "tinynet.digits")
    sign.sign_bundle(root, Path(key["private"]))
    return root


def test_record_appends_rows_regenerates_card_and_drops_the_stale_signature(bundle):
    assert "No measurements yet" in (bundle / "MODEL_CARD.md").read_text()
    result = perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 1.5, threads=4),
                                  rec(bundle, "tflite", "fp32", PI, 7.25, energy=0.012)])
    assert (result.added, result.rows, result.duplicates, result.signature) == (2, 2, 0, "dropped")
    rows = json.loads((bundle / "perf.json").read_text())["rows"]
    assert json.loads((bundle / "perf.json").read_text())["schema"] == "effai.perf/1"
    assert rows[0] == {"device": "ASUS System Product Name (AMD Ryzen 9 7950X 16-Core Processor)",
                       "device_class": "desktop", "transport": "host", "os": "Ubuntu 24.04 LTS",
                       "runtime": "onnxruntime", "runtime_version": "1.2.3", "target": "onnx", "precision": "fp32",
                       "artifact": "onnx-fp32", "threads": 4, "runs": 50, "median_ms": 1.5, "p90_ms": 1.65,
                       "energy_j": None, "throttling": "none", "effai_version": "0.1.0", "date": "2026-11-29",
                       "match": "manifest"}
    assert rows[1]["device_class"] == "board" and rows[1]["energy_j"] == 0.012
    assert "192.168.1.20" not in (bundle / "perf.json").read_text()          # no addresses in a shipped file
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "No measurements yet" not in card and "Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)" in card
    assert "7.250" in card
    assert not (bundle / "bundle.sig").exists() and index_mod.read(bundle)["signing"] is None
    check = sign.verify(bundle)
    assert check.ok and check.signature == "unsigned"
    assert any(f["path"] == "perf.json" for f in index_mod.read(bundle)["files"])
    more = perf.record(bundle, [rec(bundle, "onnx", "int8", PHONE, 0.9)])
    assert (more.added, more.rows, more.signature) == (1, 3, "unsigned")
    assert [r["target"] + "/" + r["precision"] for r in perf.load_rows(bundle)] == ["onnx/fp32", "tflite/fp32",
                                                                                  "onnx/int8"]
    assert sign.verify(bundle).ok


def test_record_with_a_key_re_signs(bundle, key):
    result = perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 2.0)], sign_key=Path(key["private"]))
    assert result.signature == "re-signed"
    check = sign.verify(bundle, Path(key["public"]))
    assert check.ok and check.trusted and check.signature == "valid"


def test_recording_the_same_report_twice_changes_nothing(bundle):
    records = [rec(bundle, "onnx", "fp32", DESKTOP, 2.0)]
    perf.record(bundle, records)
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    again = perf.record(bundle, records)
    assert (again.added, again.duplicates, again.signature) == (0, 1, "unchanged")
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_record_for_an_unknown_artifact_is_refused_and_nothing_is_written(bundle):
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=r"matches no artifact of bundle .*onnx/fp32 \(onnx-fp32\), tflite/fp32 "
                                         r"\(tflite-fp32\), coreml/fp16 \(coreml-fp16\), onnx/int8"):
        perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 1.0),
                             rec(None, "executorch", "fp32", DESKTOP, 1.0, sha="f" * 64)])
    with pytest.raises(UsageError, match="matches no artifact"):     # same target/precision, another model
        perf.record(bundle, [rec(None, "onnx", "fp32", DESKTOP, 1.0, sha="f" * 64, model="resnet18")])
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before


def test_other_export_of_the_same_artifact_matches_by_name_and_failed_records_are_skipped(bundle):
    result = perf.record(bundle, [rec(None, "tflite", "fp32", PHONE, 3.0, sha="e" * 64),
                                  rec(bundle, "onnx", "fp32", PHONE, 1.0, status="error")])
    assert result.added == 1 and len(result.skipped) == 1 and "it broke" in result.skipped[0]
    assert perf.load_rows(bundle)[0]["match"] == "model-target-precision"


def test_record_refuses_a_tampered_bundle(bundle):
    flip_byte(bundle / "labels.txt")
    with pytest.raises(EffaiError, match="changed: labels.txt"):
        perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 1.0)])
    assert not (bundle / "perf.json").exists() and (bundle / "bundle.sig").exists()


def test_record_refuses_an_invalid_signature(bundle):
    index = json.loads((bundle / "bundle.json").read_text())
    index["model"]["license"] = "proprietary"
    (bundle / "bundle.json").write_text(index_mod.dumps(index))
    with pytest.raises(EffaiError, match="signature invalid"):
        perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 1.0)])
    assert not (bundle / "perf.json").exists()


def test_best_latency_picks_the_minimum_per_device_class(bundle):
    assert perf.best_latency(bundle) == {}
    perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 2.0, threads=1),
                         rec(bundle, "onnx", "fp32", DESKTOP, 0.8, threads=8),
                         rec(bundle, "onnx", "int8", DESKTOP, 1.1, threads=8),
                         rec(bundle, "tflite", "fp32", PHONE, 4.0),
                         rec(bundle, "onnx", "int8", PHONE, 3.5, threads=4),
                         rec(bundle, "tflite", "fp32", PI, 9.0)])
    best = perf.best_latency(bundle)
    assert list(best) == ["phone", "board", "desktop"]
    assert best["desktop"] == {"median_ms": 0.8, "p90_ms": 0.88, "device": perf.describe_device(DESKTOP),
                               "target": "onnx", "precision": "fp32", "threads": 8, "runtime": "onnxruntime",
                               "date": "2026-11-29"}
    assert (best["phone"]["median_ms"], best["phone"]["precision"], best["phone"]["threads"]) == (3.5, "int8", 4)
    assert best["board"]["median_ms"] == 9.0


def test_perf_json_from_a_newer_effai(bundle):
    (bundle / "perf.json").write_text(json.dumps({"schema": "effai.perf/3", "rows": []}))
    with pytest.raises(UsageError, match="newer effai.*pip install -U effai"):
        perf.best_latency(bundle)


@pytest.mark.parametrize("device, cls", [
    (PHONE, "phone"),
    ({"name": "host", "os": "Android 13"}, "phone"),
    (PI, "board"),
    ({"name": "ssh:nvidia@jetson", "transport": "ssh", "model": "NVIDIA Jetson Orin Nano Developer Kit",
      "machine": "aarch64", "cores": 6}, "board"),
    ({"name": "ssh:rock@rock5b", "transport": "ssh", "model": "Radxa ROCK 5B", "soc": "rockchip,rk3588"}, "board"),
    ({"name": "ssh:me@armbox", "transport": "ssh", "machine": "aarch64", "cpu": "Cortex-A55"}, "board"),
    ({"name": "ssh:ec2-user@1.2.3.4", "transport": "ssh", "machine": "aarch64", "cpu": "Neoverse-N1",
      "model": "Amazon EC2 c7g.xlarge"}, "server"),
    ({"name": "host", "model": "Dell Inc. XPS 13 9310", "cpu": "11th Gen Intel(R) Core(TM) i7-1185G7"}, "laptop"),
    ({"name": "host", "model": "MacBookPro18,3", "cpu": "Apple M1 Pro"}, "laptop"),
    ({"name": "host", "model": "LENOVO 20XW ThinkPad X1 Carbon Gen 9"}, "laptop"),
    ({"name": "host", "model": "Supermicro SYS-2029", "cpu": "Intel(R) Xeon(R) Gold 6338"}, "server"),
    ({"name": "host", "cpu": "AMD EPYC 7763 64-Core Processor", "cores": 128}, "server"),
    ({"name": "host", "model": "QEMU Standard PC (i440FX + PIIX, 1996)", "cores": 2}, "server"),
    ({"name": "host", "cpu": "Some CPU", "cores": 48}, "server"),
    (DESKTOP, "desktop"),
    ({"name": "host", "model": "Mac14,3", "cpu": "Apple M2"}, "desktop"),
    ({"name": "host"}, "desktop"),
    ({"name": "host", "device_class": "laptop", "cpu": "Intel Xeon"}, "laptop"),
])
def test_device_class_rules(device, cls):
    assert perf.device_class(device) == cls


def test_real_host_bench_records_into_a_bundle(tmp_path):
    """effai bench on a tiny real ONNX artifact inside a bundle, then record: the record matches by manifest."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from effai.device_bench.base import BenchConfig
    from effai.device_bench.bench import run_bench
    from effai.files import sha256

    root = make_bundle(tmp_path / "b", artifacts=(("tflite", "fp32", "model.tflite"),))
    d = root / "onnx-fp32"
    d.mkdir()
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), d / "model.onnx")
    manifest = {"schema": "effai.manifest/1", "model": {"name": "tinynet.digits"}, "target": "onnx",
                "precision": "fp32", "model_file": "model.onnx", "status": "pass",
                "inputs": [{"name": "input", "shape": [1, 3], "dtype": "float32"}],
                "outputs": [{"name": "logits", "shape": [1, 3], "dtype": "float32"}],
                "files": [{"path": "model.onnx", "bytes": (d / "model.onnx").stat().st_size,
                           "sha256": sha256(d / "model.onnx")}]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    index = index_mod.read(root)
    index["artifacts"].append({"target": "onnx", "precision": "fp32", "dir": "onnx-fp32",
                               "model_file": "onnx-fp32/model.onnx", "status": "pass", "error": None,
                               "parity": None, "accuracy": None, "bytes": (d / "model.onnx").stat().st_size})
    sign.reindex(root, index)
    cfg = BenchConfig(threads=(1,), warmup=1, runs=5, cooldown_s=0.0, idle_s=0.0, energy="none")
    result = run_bench([d], "host", cfg, tmp_path / "report.json")
    assert result.records and result.records[0].status == "ok", result.records[0].error
    from effai.device_bench import report

    _, records = report.load(tmp_path / "report.json")            # what `effai bench --record` would read back
    recorded = perf.record(root, records)
    assert recorded.added == 1
    row = perf.load_rows(root)[0]
    assert (row["match"], row["target"], row["runtime"], row["transport"]) == ("manifest", "onnx", "onnxruntime",
                                                                               "host")
    assert row["device_class"] in perf.CLASSES and row["median_ms"] > 0
    assert sign.verify(root).ok
    assert perf.best_latency(root)[row["device_class"]]["median_ms"] == row["median_ms"]

    # effai bench --record checks the bundle, the key and the artifacts BEFORE measuring
    from tests.helpers import run_cli

    stranger = tmp_path / "stranger"
    import shutil

    shutil.copytree(d, stranger)
    manifest["model"]["name"] = "othernet"
    (stranger / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "never.json"
    code, last, _, _ = run_cli("bench", str(stranger), "--runs", "5", "--out", str(out), "--record", str(root),
                               "--json")
    assert code == 2 and "matches no artifact of bundle" in last["error"] and not out.exists()
    code, last, _, _ = run_cli("bench", str(d), "--runs", "5", "--out", str(out), "--record", str(root),
                               "--record-key", str(tmp_path / "no-such-key"), "--json")
    assert code == 2 and "no-such-key" in last["error"] and not out.exists()
    code, last, _, _ = run_cli("bench", str(d), "--runs", "5", "--out", str(out), "--record-key", "k", "--json")
    assert code == 2 and "--record-key needs --record" in last["error"] and not out.exists()


def test_repacking_keeps_rows_of_unchanged_artifacts_only(tmp_path):
    import shutil

    from effai.bundle.pack import carry_perf

    old = make_bundle(tmp_path / "old")
    rows = [{"artifact": d, "device": "Pixel 8", "device_class": "phone", "median_ms": 1.0}
            for d in ("onnx-fp32", "tflite-fp32", "gone-fp32")]
    (old / "perf.json").write_text(json.dumps({"schema": "effai.perf/1", "rows": rows}))
    new = tmp_path / "new"
    shutil.copytree(old, new)
    (new / "perf.json").unlink()
    (new / "tflite-fp32" / "model.tflite").write_bytes(b"re-exported, other bytes")
    assert carry_perf(old, new, index_mod.read(old)["artifacts"]) == 1
    assert [r["artifact"] for r in perf.load_rows(new)] == ["onnx-fp32"]
    assert carry_perf(tmp_path / "nothing-there", new, []) == 0


def test_record_refuses_a_removed_signature(bundle, key):
    """Issue 21: a file changed, its hash updated, bundle.sig deleted: recording must not re-sign (or unsign) it."""
    from tests.test_bundle_sign import strip_signature

    strip_signature(bundle)
    before = (bundle / "bundle.json").read_bytes()
    for sign_key in (Path(key["private"]), None):
        with pytest.raises(EffaiError, match="signature removed") as e:
            perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 1.0)], sign_key=sign_key)
        assert "Only if you packed it yourself" in str(e.value)
    with pytest.raises(EffaiError, match="--record: bundle .*signature removed"):
        perf.precheck(bundle, [], Path(key["private"]))
    assert not (bundle / "perf.json").exists() and not (bundle / "bundle.sig").exists()
    assert (bundle / "bundle.json").read_bytes() == before


def test_record_notes_the_signature_it_drops_or_replaces(bundle, key, tmp_path):
    dropped = perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 1.0)])
    assert dropped.signature == "dropped" and key["key_id"] in dropped.notes[-1]
    assert "if you publish this bundle" in dropped.notes[-1]
    sign.sign_bundle(bundle, Path(key["private"]))
    other = sign.keygen(tmp_path / "other.key")
    resigned = perf.record(bundle, [rec(bundle, "onnx", "fp32", DESKTOP, 2.0)], sign_key=Path(other["private"]))
    assert resigned.signature == "re-signed"
    assert resigned.notes == [f"re-signed with key {other['key_id']}; it was signed by key {key['key_id']}"]


def test_cli_bench_record_refuses_a_removed_signature_before_measuring(tmp_path, key):
    import subprocess
    import sys

    from effai.files import sha256
    from tests.test_bundle_sign import strip_signature

    root = make_bundle(tmp_path / "b", artifacts=(("onnx", "fp32", "model.onnx"),))
    d = root / "onnx-fp32"
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = [{**f, "sha256": sha256(d / f["path"])} for f in manifest["files"]]
    (d / "manifest.json").write_text(json.dumps(manifest))
    sign.reindex(root, index_mod.read(root))
    sign.sign_bundle(root, Path(key["private"]))
    strip_signature(root)
    out = tmp_path / "never.json"
    proc = subprocess.run([sys.executable, "-m", "effai", "bench", str(d), "--out", str(out), "--record", str(root),
                           "--record-key", key["private"], "--json"], capture_output=True, text=True, timeout=300)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and "signature removed" in last["error"], proc.stderr
    assert not out.exists() and not (root / "bundle.sig").exists()
