"""effai zoo pack, MODEL_CARD.md and zoo list: ghostnetv3_050.digits packed twice (through the API to tflite, onnx
and coreml; through the CLI to all four targets, signed) and compared file by file on the shared targets; the
issue's done-when path on the signed four-target bundle (verify, a flipped byte in every file, native metadata read
by each format's own tooling, effai bench --record filling the card's perf table); a partial pack; refusals; the
MAC counter. ExecuTorch's 40 s lowering is paid once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

from effai.bundle import model_card_md as card_mod
from effai.bundle import index as index_mod
from effai.bundle import pack as pack_mod
from effai.errors import UsageError
from effai.files import sha256
from tests.helpers import ROOT, run_cli

MODEL = "ghostnetv3_050.digits"
TARGETS = ["tflite", "onnx", "coreml"]
EPOCH = "1764460800"            # 2025-11-30T00:00:00Z


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """The same bundle packed twice from the same inputs: through the API, then through the CLI (--json)."""
    base = tmp_path_factory.mktemp("packs")
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    try:
        first = pack_mod.pack(MODEL, TARGETS, ["fp32"], base / "a")
    finally:
        if old is None:
            os.environ.pop("SOURCE_DATE_EPOCH")
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old
    from effai.bundle import sign

    sign.keygen(base / "key.pem")
    code, last, _, err = run_cli("zoo", "pack", MODEL, "--targets", ",".join(TARGETS + ["executorch"]),
                                 "--quantize", "fp32", "--out", str(base / "b"), "--sign", str(base / "key.pem"),
                                 "--json", env={"SOURCE_DATE_EPOCH": EPOCH})
    assert code == 0, err[-3000:]
    return first, base / "b" / MODEL, last


def test_layout_and_index(packs):
    res, _, _ = packs
    root = res.root
    assert root.name == MODEL and res.status == "complete"
    for name in ("bundle.json", "MODEL_CARD.md", "labels.txt", "preprocessing.json"):
        assert (root / name).is_file(), name
    assert (root / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    pre = json.loads((root / "preprocessing.json").read_text())
    assert pre["input_size"] == [64, 64] and pre["mean"] == [0.5] and pre["how_to"]
    index = index_mod.read(root)
    assert index_mod.check(root) == []
    listed = {f["path"]: f for f in index["files"]}
    on_disk = _hashes(root)
    assert set(listed) == set(on_disk) - {"bundle.json"}
    assert all(listed[p]["sha256"] == h for p, h in on_disk.items() if p in listed)
    assert [(a["target"], a["precision"], a["dir"]) for a in index["artifacts"]] == [
        (t, "fp32", f"{t}-fp32") for t in TARGETS]
    for a in index["artifacts"]:
        assert a["status"] == ("unverified" if a["target"] == "coreml" else "pass")
        assert (root / a["model_file"]).exists() and a["bytes"] > 1_000_000
        manifest = json.loads((root / a["dir"] / "manifest.json").read_text())
        assert not (root / a["dir"] / "export.log").exists()
        assert "timings_s" not in manifest and manifest["created_at"] == "2025-11-30T00:00:00+00:00"
        assert manifest["export_config"]["out"] == a["dir"]
        assert manifest["model"]["weights"] == "bundled:ghostnetv3_050_digits.safetensors"
        from effai.export.manifest import check_files

        assert check_files(root / a["dir"], manifest) == []   # the re-hashed artifact still verifies on its own
    m = index["model"]
    assert m["task"] == "image-classification" and m["input_size"] == [1, 64, 64] and m["num_classes"] == 10
    assert m["weights"]["available"] == "bundled" and m["weights"]["sha256"]
    assert m["trained"]["data"] == "digits" and m["trained"]["held_out_top1"] > 0.9
    assert 1_000_000 < m["params"] < 2_000_000 and 1_000_000 < m["macs"] < 50_000_000
    assert index["signing"] is None and index["skipped"] == []
    assert "\n" not in json.dumps(index["deterministic"]["varies"])   # one line per reason


def test_card_has_accuracy_per_artifact_and_perf_note(packs):
    res, _, _ = packs
    text = (res.root / "MODEL_CARD.md").read_text()
    assert text == card_mod.render(res.root)
    acc = text.split("## Accuracy per artifact")[1].split("\n## ")[0]
    rows = [ln for ln in acc.splitlines() if ln.startswith("| ") and "target" not in ln]
    assert [r.split("|")[1].strip() for r in rows] == TARGETS
    for r in rows:
        if "coreml" in r:
            assert "not-run (Core ML runtime needs macOS)" in r
        else:
            assert r.count("98.89%") == 2, r        # torch and artifact top-1 on the held-out digits
    assert "No measurements yet: run `effai bench <bundle>/tflite-fp32 --record <bundle>`" in text
    for s in ("1 MAC = one multiply-add", "bundled:ghostnetv3_050_digits.safetensors", "Apache-2.0",
              "knowledge distillation", "`tflite-fp32/model.tflite`", "`coreml-fp32/model.mlpackage`",
              "labels.txt", "Bundle status: complete"):
        assert s in text, s
    assert "2026-" not in text and "T0" not in text       # no wall-clock time


def test_card_perf_table_from_perf_json(packs, tmp_path):
    import shutil

    res, _, _ = packs
    root = tmp_path / "b"
    shutil.copytree(res.root, root)
    rows = [{"device": "Pixel 8 (Tensor G3)", "device_class": "phone", "runtime": "litert", "runtime_version": "2.3.0",
             "target": "tflite", "precision": "fp32", "threads": 4, "median_ms": 1.234, "p90_ms": 1.5,
             "energy_j": None, "effai_version": "0.1.0", "date": "2026-11-29"}]
    (root / "perf.json").write_text(json.dumps({"schema": "effai.perf/1", "rows": rows}))
    text = card_mod.render(root)
    assert "No measurements yet" not in text
    assert ("| phone | Pixel 8 (Tensor G3) | litert 2.3.0 | tflite | fp32 | 4 | 1.234 | 1.500 | - | 0.1.0 | "
            "2026-11-29 |") in text


def test_packing_twice_gives_identical_files(packs):
    res, other, last = packs
    assert last["ok"] is True and last["status"] == "complete"
    # the CLI pack adds executorch and a signature: the index, card and signature differ by design, the rest must not
    added = ("executorch-fp32/", "bundle.json", "bundle.sig", "MODEL_CARD.md")
    a, b = _hashes(res.root), {p: h for p, h in _hashes(other).items() if not p.startswith(added)}
    assert set(a) - {"bundle.json", "MODEL_CARD.md"} == set(b)
    differ = sorted(p for p in b if a[p] != b[p])
    claimed = res.index["deterministic"]
    # SOURCE_DATE_EPOCH pins coremltools' conversion date too: every file is claimed identical, so is bundle.json
    assert claimed["varies"] == {}
    assert set(claimed["identical"]) == set(a) - {"bundle.json"}
    assert differ == [], f"claimed identical but differ: {differ}"


def test_determinism_claims_without_source_date_epoch(packs, monkeypatch):
    res, _, _ = packs
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    d = pack_mod.determinism(res.root, res.index["artifacts"])
    assert list(d["varies"]) == ["coreml-fp32/model.mlpackage/Data/com.apple.CoreML/model.mlmodel"]
    assert "conversion date" in d["varies"][list(d["varies"])[0]]


def test_mlpackage_normalization_keeps_the_spec(packs, tmp_path):
    """Canonical Core ML bytes: same spec message, name-based UUIDs consistent with rootModelIdentifier."""
    from coremltools.proto import Model_pb2

    res, _, _ = packs
    pkg = res.root / "coreml-fp32" / "model.mlpackage"
    doc = json.loads((pkg / "Manifest.json").read_text())
    assert doc["rootModelIdentifier"] in doc["itemInfoEntries"]
    spec = Model_pb2.Model()
    spec.ParseFromString((pkg / "Data/com.apple.CoreML/model.mlmodel").read_bytes())
    assert spec.description.metadata.userDefined["com.github.apple.coremltools.conversion_date"] == "2025-11-30"
    assert spec.SerializeToString(deterministic=True) == (pkg / "Data/com.apple.CoreML/model.mlmodel").read_bytes()


def test_done_when_signed_four_target_bundle_verifies_detects_tampering_and_records_perf(packs, tmp_path):
    """The issue's done-when path, on the signed CLI bundle (a copy: the other tests read the original)."""
    import shutil
    import zipfile

    import onnx
    from ai_edge_litert import schema_py_generated as tfl
    from coremltools.models.utils import load_spec

    from effai.bundle import sign
    from effai.export._vendor import tflite_metadata_schema as md

    _, signed, _ = packs
    key = signed.parent.parent / "key.pem"
    root = tmp_path / MODEL
    shutil.copytree(signed, root)
    index = index_mod.read(root)
    assert sorted(a["target"] for a in index["artifacts"]) == ["coreml", "executorch", "onnx", "tflite"]
    assert all(a["status"] in ("pass", "unverified") for a in index["artifacts"])
    code, last, _, err = run_cli("zoo", "verify", str(root), "--pubkey", str(sign.public_path(key)), "--json")
    assert code == 0 and last["ok"] and last["signature"] == "valid" and last["trusted"], (last, err[-2000:])

    # native metadata, read by each format's own tooling
    # coremltools rewrites Manifest.json of a package it opens (fresh item ids): read a copy, as docs/bundle.md says
    shutil.copytree(root / "coreml-fp32" / "model.mlpackage", tmp_path / "copy.mlpackage")
    spec = load_spec(str(tmp_path / "copy.mlpackage"))
    assert spec.description.metadata.license and json.loads(spec.description.metadata.userDefined["preprocessing"])
    assert spec.description.predictedFeatureName and len(spec.description.output) >= 2   # classifier + logits
    buf = (root / "tflite-fp32" / "model.tflite").read_bytes()
    model = tfl.Model.GetRootAs(buf, 0)
    names = [model.Metadata(i).Name().decode() for i in range(model.MetadataLength())]
    assert "TFLITE_METADATA" in names
    assert zipfile.ZipFile(root / "tflite-fp32" / "model.tflite").read("labels.txt").decode().split() == [
        str(i) for i in range(10)]
    meta = model.Buffers(dict(zip(names, (model.Metadata(i).Buffer() for i in range(len(names)))))[
        "TFLITE_METADATA"]).DataAsNumpy().tobytes()
    assert md.ModelMetadata.GetRootAs(meta, 0).Name().decode() == MODEL
    props = {p.key: p.value for p in onnx.load(str(root / "onnx-fp32" / "model.onnx")).metadata_props}
    assert json.loads(props["labels"]) == [str(i) for i in range(10)] and "preprocessing" in props
    manifest = json.loads((root / "executorch-fp32" / "manifest.json").read_text())
    assert manifest["native_metadata"]["format"] == "sidecar"

    # effai bench --record fills the card's perf table and re-signs
    arts = [str(root / d) for d in ("executorch-fp32", "tflite-fp32", "onnx-fp32")]
    code, last, _, err = run_cli("bench", *arts, "--runs", "5", "--warmup", "1", "--cooldown", "0", "--idle", "0",
                                 "--out", str(tmp_path / "bench.json"), "--record", str(root), "--record-key",
                                 str(key), env={"OMP_NUM_THREADS": "1"})
    assert code == 0, err[-3000:]
    assert last["recorded"]["added"] == 3 and last["recorded"]["signature"] == "re-signed", last["recorded"]
    card = (root / "MODEL_CARD.md").read_text()
    assert "No measurements yet" not in card
    perf = card.split("Performance")[1] if "Performance" in card else card
    for target in ("executorch", "tflite", "onnx"):
        assert f"| {target} | fp32 | 1 |" in perf, perf[:2000]
    result = sign.verify(root, sign.public_path(key))
    assert result.ok and result.signature == "valid", result

    # a flipped byte in any file is found and named; bundle.json itself breaks the signature
    for f in index_mod.read(root)["files"] + [{"path": "bundle.json"}]:
        path = root / f["path"]
        original = path.read_bytes()
        path.write_bytes(bytes([original[0] ^ 0x01]) + original[1:])
        try:
            res = sign.verify(root, sign.public_path(key))
        except UsageError as e:       # a bundle.json that no longer parses is refused outright
            assert f["path"] == "bundle.json" and "not valid JSON" in str(e), e
            continue
        finally:
            path.write_bytes(original)
        assert not res.ok, f["path"]
        assert any(f["path"] in p for p in res.problems) or (f["path"] == "bundle.json" and res.signature ==
                                                            "invalid"), (f["path"], res.problems)
    assert sign.verify(root, sign.public_path(key)).ok


PARTIAL = textwrap.dedent("""
    import sys
    from effai.export.targets import TARGETS

    def boom(*args, **kwargs):
        raise RuntimeError("simulated converter crash\\nsecond line")

    TARGETS.get("tflite").lower = boom
    sys.argv = ["effai", *sys.argv[1:]]
    from effai.cli import main
    main()
""")


def test_partial_pack_records_the_failure_and_exits_1(tmp_path):
    from effai.bundle import sign

    key = tmp_path / "key.pem"
    sign.keygen(key)
    stale = tmp_path / "out" / MODEL                     # an earlier bundle there is replaced as a whole
    stale.mkdir(parents=True)
    (stale / "bundle.json").write_text(json.dumps({"schema": "effai.bundle/1", "files": []}))
    (stale / "old-artifact.bin").write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", PARTIAL, "zoo", "pack", MODEL, "--targets", "tflite,onnx",
                           "--quantize", "fp32,fp16", "--out", str(tmp_path / "out"), "--sign", str(key), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last["ok"] is False and last["status"] == "partial" and "partial" in last["error"]
    root = tmp_path / "out" / MODEL
    index = index_mod.read(root)
    assert index["status"] == "partial"
    by_dir = {a["dir"]: a for a in index["artifacts"]}
    assert set(by_dir) == {"tflite-fp32", "tflite-fp16", "onnx-fp32"}
    for d in ("tflite-fp32", "tflite-fp16"):
        assert by_dir[d]["status"] == "export-failed" and by_dir[d]["model_file"] is None
        assert "simulated converter crash" in by_dir[d]["error"] and "\n" not in by_dir[d]["error"]
        assert not (root / d).exists()
    assert not (root / "old-artifact.bin").exists() and sorted(os.listdir(tmp_path / "out")) == [MODEL]
    ok = by_dir["onnx-fp32"]
    assert ok["status"] == "pass" and (root / "onnx-fp32" / "model.onnx").is_file()
    assert ok["accuracy"]["artifact"]["top1"] > 0.95 and ok["parity"]["runtime"].startswith("onnxruntime")
    assert [(s["target"], s["precision"]) for s in index["skipped"]] == [("onnx", "fp16")]
    card = (root / "MODEL_CARD.md").read_text()
    assert "Bundle status: partial" in card and "**tflite fp32**: export failed" in card
    assert "onnx fp16: not built" in card
    assert "No measurements yet: run `effai bench <bundle>/onnx-fp32 --record <bundle>`" in card
    assert "| onnx | fp32 | 98.89% | 100.00% | 98.89% | 100.00% | 0.00 | pass |" in card
    assert index_mod.check(root) == []
    # --sign: the signing block is in bundle.json and bundle.sig verifies against the key's public half
    assert index["signing"]["key_id"] == sign.public_block(key)["key_id"]
    result = sign.verify(root, sign.public_path(key))
    assert result.ok and result.signature == "valid", result


def test_refuses_to_replace_a_non_bundle_dir(tmp_path):
    victim = tmp_path / "out" / MODEL
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("mine")
    with pytest.raises(UsageError, match="refusing to replace .* not an effai bundle"):
        pack_mod.pack(MODEL, ["onnx"], None, tmp_path / "out")
    assert (victim / "precious.txt").read_text() == "mine" and sorted(os.listdir(tmp_path / "out")) == [MODEL]


def test_bad_input_is_refused_before_exporting(tmp_path):
    with pytest.raises(UsageError, match="unknown --quantize 'fp33'"):
        pack_mod.pack(MODEL, ["onnx"], ["fp33"], tmp_path)
    with pytest.raises(UsageError, match="no target takes"):
        pack_mod.pack(MODEL, ["onnx"], ["fp16"], tmp_path)
    with pytest.raises(UsageError, match="unknown target"):
        pack_mod.pack(MODEL, ["onnxx"], None, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_every_export_failing_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError) as e:
        pack_mod.pack(MODEL, ["tflite"], None, out, eval=str(tmp_path / "no-such-images"))
    assert "no-such-images" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() or list(out.iterdir()) == []          # no bundle, no temp dir left behind


def test_mac_counter_convention():
    """1 MAC = one multiply-add; conv groups respected; Linear counted per output element."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    stats = pack_mod.model_stats(model, (3, 8, 8))
    assert stats["macs"] == 8 * 8 * 8 * 3 * 9 + 8 * 8 * 8 * 1 * 9 + 4 * 4 * 16 * 8 + 10 * 16
    # the BN folds into the first conv in the deploy form: its 16 parameters are gone
    assert stats["params"] == sum(p.numel() for p in model.parameters()) - 16
    assert isinstance(model[1], nn.BatchNorm2d)              # the caller's model is untouched


def test_zoo_list_shows_macs_params_and_latency(packs, tmp_path):
    import shutil

    res, _, _ = packs
    bundles = tmp_path / "bundles"
    shutil.copytree(res.root, bundles / MODEL)
    rows = [{"device": "Raspberry Pi 5", "device_class": "board", "runtime": "litert", "target": "tflite",
             "precision": "fp32", "threads": 4, "median_ms": ms, "p90_ms": ms + 1, "date": "2026-11-29"}
            for ms in (3.5, 2.25)]
    (bundles / MODEL / "perf.json").write_text(json.dumps({"schema": "effai.perf/1", "rows": rows}))
    code, last, out, err = run_cli("zoo", "list", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert code == 0, err
    assert "MACs" in out and "params" in out and "board 2.25 ms" in out
    models = {m["name"]: m for m in last["models"]}
    digits = models[MODEL]
    assert digits["macs"] == res.index["model"]["macs"] and digits["params"] == res.index["model"]["params"]
    assert digits["best_latency"]["board"]["median_ms"] == 2.25 and last["bundles"] == "bundles"
    assert digits["task"] == "image-classification" and digits["input_size"] == [1, 64, 64]
    assert digits["weights_available"] == "bundled" and "Apache-2.0" in digits["license"]
    mnv2 = models["mobilenetv2_100"]
    assert 290e6 < mnv2["macs"] < 310e6 and 3.4e6 < mnv2["params"] < 3.6e6     # the published 300M MACs, 3.5M
    assert mnv2["best_latency"] is None and mnv2["weights_available"] == "hub"
    code, last2, out2, _ = run_cli("zoo", "list", "--json", "--bundles", str(tmp_path / "nope"))
    assert code == 2 and "not a directory" in last2["error"] and out2.count("\n") == 1
