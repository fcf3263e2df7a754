"""Hostile bundle files (issue 21 item 4): malformed, deeply nested or mis-shaped bundle.json / manifest.json /
perf.json are a one-line usage error (exit 2) from the real CLI, never 'internal error, please report it'."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from effai.bundle import index as index_mod
from effai.bundle import perf, sign
from effai.errors import UsageError
from tests.test_bundle_sign import make_bundle

DEEP = "[" * 50_000 + "]" * 50_000          # parses to RecursionError in json.loads


def effai(*args: str) -> tuple[int, dict, str]:
    """`effai ARGS --json` in a real process: (exit code, last-line JSON, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "effai", *args, "--json"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr


def assert_usage(code: int, out: dict, err: str, *needles: str) -> None:
    assert code == 2, (out, err)
    assert "internal error" not in out.get("error", "") and "Traceback" not in err
    assert "\n" not in out["error"]
    for n in needles:
        assert n in out["error"], (n, out["error"])


def edit_index(root: Path, edit) -> None:
    index = json.loads((root / "bundle.json").read_text())
    edit(index)
    (root / "bundle.json").write_text(json.dumps(index))


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "b")


def install(root: Path, into: Path, target: str = "onnx", precision: str = "fp32"):
    return effai("zoo", "install", str(root), "--into", str(into), "--target", target, "--precision", precision)


def test_deeply_nested_bundle_json(bundle, tmp_path):
    (bundle / "bundle.json").write_text(DEEP)
    assert_usage(*effai("zoo", "verify", str(bundle)), "nested too deeply")
    assert_usage(*install(bundle, tmp_path / "app"), "nested too deeply")
    assert not (tmp_path / "app").exists()


def test_artifacts_that_are_not_objects(bundle, tmp_path):
    edit_index(bundle, lambda i: i.update(artifacts=[1, "x", None]))
    assert_usage(*effai("zoo", "verify", str(bundle)), "artifacts[0] is int, not an object")
    assert_usage(*install(bundle, tmp_path / "app"), "artifacts[0]")


@pytest.mark.parametrize("model_file, why", [
    ("labels.txt", "is not a model file of onnx-fp32/"),
    ("onnx-fp32/manifest.json", "is not a model file of onnx-fp32/"),
    ("onnx-fp32/parity.npz", "is not a model file of onnx-fp32/"),
    ("tflite-fp32/model.tflite", "is not a model file of onnx-fp32/"),
    ("onnx-fp32/../labels.txt", "not a relative path inside the bundle"),
    ("/etc/passwd", "not a relative path inside the bundle"),
    ("onnx-fp32/model.bin", "is not among the files bundle.json hashes"),
    (7, "model_file is not a string"),
])
def test_model_file_must_be_a_hashed_model_file_of_its_artifact(bundle, tmp_path, model_file, why):
    edit_index(bundle, lambda i: i["artifacts"][0].update(model_file=model_file))
    assert_usage(*install(bundle, tmp_path / "app"), why)
    assert not (tmp_path / "app").exists()


@pytest.mark.parametrize("field, value, why", [
    ("dir", "../elsewhere", "not a relative path inside the bundle"),
    ("target", None, "artifacts[0].target is missing or not a string"),
    ("status", "great", "artifacts[0].status 'great' is not one of"),
    ("parity", "fine", "artifacts[0].parity is not an object"),
])
def test_artifact_fields(bundle, tmp_path, field, value, why):
    edit_index(bundle, lambda i: i["artifacts"][0].update({field: value}))
    with pytest.raises(UsageError, match="bundle.json is damaged|refusing the bundle") as e:
        index_mod.read(bundle)
    assert why in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("edit", [
    lambda i: i.update(skipped=[1]),
    lambda i: i.update(deterministic="yes"),
    lambda i: i["model"].update(input_size=[1, 8]),
    lambda i: i["model"].update(name={"x": 1}),
])
def test_other_index_fields_the_card_relies_on(bundle, edit):
    edit_index(bundle, edit)
    with pytest.raises(UsageError, match="bundle.json is damaged"):
        index_mod.read(bundle)


def test_deeply_nested_manifest_in_a_rehashed_bundle(bundle, tmp_path):
    (bundle / "onnx-fp32" / "manifest.json").write_text(DEEP)
    index_mod.write(bundle, index_mod.read(bundle))        # hashes updated: only the JSON itself is hostile
    assert_usage(*install(bundle, tmp_path / "app"), "onnx-fp32/manifest.json", "nested too deeply")
    assert sign.verify(bundle).ok                           # verify hashes files, it does not parse manifests
    key = sign.keygen(tmp_path / "k.key")
    code, out, err = effai("zoo", "sign", str(bundle), "--key", key["private"])   # the card skips what it cannot read
    assert code == 0, (out, err)


def test_manifest_naming_another_model_file(bundle, tmp_path):
    m = json.loads((bundle / "onnx-fp32" / "manifest.json").read_text())
    m["model_file"] = "../labels.txt"
    (bundle / "onnx-fp32" / "manifest.json").write_text(json.dumps(m))
    index_mod.write(bundle, index_mod.read(bundle))
    assert_usage(*install(bundle, tmp_path / "app"), "names onnx-fp32/model.onnx as the onnx model but")


def test_manifest_fields_of_the_wrong_type_fail_the_card_with_one_line(bundle, tmp_path):
    m = json.loads((bundle / "onnx-fp32" / "manifest.json").read_text())
    m["inputs"] = [1]
    (bundle / "onnx-fp32" / "manifest.json").write_text(json.dumps(m))
    index_mod.write(bundle, index_mod.read(bundle))
    key = sign.keygen(tmp_path / "k.key")
    assert_usage(*effai("zoo", "sign", str(bundle), "--key", key["private"]), "cannot write", "MODEL_CARD.md")


def test_hostile_perf_json(bundle, tmp_path):
    (bundle / "perf.json").write_text(DEEP)
    with pytest.raises(UsageError, match="nested too deeply"):
        perf.load_rows(bundle)
    with pytest.raises(UsageError, match="nested too deeply"):
        perf.best_latency(bundle)
    rows = [{"device_class": ["phone"], "median_ms": 1.0}, {"device_class": "board", "median_ms": 10 ** 400},
            {"device_class": "phone", "median_ms": "2.5", "energy_j": "lots", "threads": [4]}, 3]
    (bundle / "perf.json").write_text(json.dumps({"schema": "effai.perf/1", "rows": rows}))
    assert perf.best_latency(bundle) == {"phone": {"median_ms": 2.5, "p90_ms": None, "device": None, "target": None,
                                                   "precision": None, "threads": [4], "runtime": None, "date": None}}
    index_mod.write(bundle, index_mod.read(bundle))
    key = sign.keygen(tmp_path / "k.key")
    sign.sign_bundle(bundle, Path(key["private"]))         # the card's perf table skips what is not a number
    assert "3 measurement(s) from `perf.json`" in (bundle / "MODEL_CARD.md").read_text()


def test_zoo_list_skips_a_hostile_bundle(bundle, tmp_path):
    from effai.cli.zoo import _bundle_latency

    (bundle / "perf.json").write_text(json.dumps({"schema": "effai.perf/1", "rows": [
        {"device_class": "phone", "median_ms": 1.5}]}))
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "bundle.json").write_text(DEEP)
    assert list(_bundle_latency(tmp_path)) == ["tinynet.digits"]


def test_pack_does_not_take_a_hostile_bundle_json_for_a_bundle(tmp_path):
    from effai.bundle.pack import is_bundle

    (tmp_path / "bundle.json").write_text(DEEP)
    assert not is_bundle(tmp_path)          # so `zoo pack --out` refuses to replace it (exit 2), no RecursionError
    (tmp_path / "bundle.json").write_text(json.dumps({"schema": ["effai.bundle/1"]}))
    assert not is_bundle(tmp_path)
