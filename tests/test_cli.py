"""The command line as a user runs it (real subprocesses): exit codes, clear one-line errors, a final JSON line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import run_cli


def test_zoo_list_and_show():
    code, last, out, _ = run_cli("zoo", "list")
    assert code == 0 and "ghostnetv3_100" in out and last["ok"]
    assert {m["name"] for m in last["models"]} >= {"ghostnetv3_050", "mobileone_s0", "repvgg_a0"}
    assert last["params_form"].startswith("deploy")
    code, last, _, _ = run_cli("zoo", "show", "ghostnetv3_100", "--json")
    m = last["model"]
    assert code == 0 and m["reparameterizable"] and m["params_training_form"] > m["params_deploy_form"] > 5_000_000
    code, last, _, _ = run_cli("zoo", "list", "ghostnetv3_05", "--timm", "--json")   # a substring; timm names too
    assert code == 0 and [r["name"] for r in last["models"]] == ["ghostnetv3_050", "ghostnetv3_050.digits"]
    code, last, _, _ = run_cli("zoo", "list", "resnet1*", "--timm", "--json")
    assert last["models"] == [] and "resnet18" in last["timm"]


def test_doctor_lists_every_target():
    code, last, out, _ = run_cli("doctor", "--json")
    assert code == 0 and set(last["targets"]) == {"coreml", "executorch", "onnx", "tflite"}
    assert all(t["available"] for t in last["targets"].values()) and last["toolchain"]["executorch"].startswith("1.5")


@pytest.mark.parametrize("args,needle", [
    (("export", "ghostnetv3_100", "--target", "tflit"), "did you mean 'tflite'"),
    (("export", "ghostnetv3-100", "--target", "onnx"), "did you mean 'ghostnetv3_100'"),
    (("export", "ghostnetv3_100", "--input-shape", "1x3x224"), "must be 4 positive numbers"),
    (("export", "ghostnetv3_100", "--weights", "/nonexistent/w.safetensors"), "weights file not found"),
    (("export", "ghostnetv3_100", "--target", "onnx", "--precision", "palette4"), "not supported by onnx"),
    (("export", "ghostnetv3_100", "--target", "onnx", "-q", "int3"), "unknown --quantize 'int3'"),
    (("export", "--model-def", "nofile.py:Net"), "--model-def file not found"),
    (("verify", "/nonexistent/artifact"), "artifact directory not found"),
])
def test_bad_usage_exits_2_with_one_clear_line(args, needle):
    code, last, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert needle in err and needle in last["error"] and last["ok"] is False
    assert "Traceback" not in err


def test_malformed_options_exit_2_with_a_json_line():
    code, last, _, err = run_cli("export", "ghostnetv3_100", "--batch", "abc")
    assert code == 2 and last["ok"] is False and "--batch" in last["error"] and "Traceback" not in err


def test_checkpoint_mismatch_exits_2_and_names_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"conv.weight": torch.zeros(2, 3, 3, 3)}, str(path))
    code, last, _, err = run_cli("export", "mobilenetv3_small_100", "--weights", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and "unexpected keys (conv.weight)" in last["error"] and "missing keys" in err
    assert not (tmp_path / "o").exists()


def test_export_prints_progress_table_and_a_final_json_line(tmp_path):
    code, last, out, err = run_cli("export", "mobilenetv3_small_100", "--target", "onnx,tflite", "--input-size", "64",
                                   "--out", str(tmp_path / "arts"))
    assert code == 0, err
    assert "RANDOM-INIT" in err and "fold" in err and "parity" in err      # progress lines on stderr
    assert "effai export" in out and "pass" in out                          # the table on stdout
    assert [a["target"] for a in last["artifacts"]] == ["onnx", "tflite"]
    assert all(a["parity"] == "pass" for a in last["artifacts"]) and last["random_init"] is True
    art = tmp_path / "arts" / "mobilenetv3_small_100-onnx-64x64"   # the folder names the non-default size
    assert (art / "model.onnx").is_file()
    code, vlast, _, _ = run_cli("verify", str(art), "--json")
    assert code == 0 and vlast["parity"]["status"] == "pass" and vlast["hashes"] == "pass"
    (art / "model.onnx").write_bytes(b"tampered")
    code, vlast, _, verr = run_cli("verify", str(art))
    assert code == 1 and vlast["hashes"] == "fail" and "model.onnx" in json.dumps(vlast["hash_problems"])


def test_json_mode_prints_only_json(tmp_path):
    code, last, out, err = run_cli("export", "mobilenetv3_small_100", "--target", "onnx", "--input-size", "32",
                                   "--out", str(tmp_path / "a"), "--json")
    assert code == 0 and out.strip().count("\n") == 0 and last["artifacts"][0]["parity"] == "pass"
    assert "✓" not in err


def test_untraceable_user_module_exits_1_naming_the_line(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\nINPUT_SHAPE = (3, 16, 16)\nclass M(torch.nn.Module):\n"
                 "    def forward(self, x):\n        return torch.from_numpy(x.numpy()).mean((2, 3))\n")
    code, last, _, err = run_cli("export", "--model-def", f"{f}:M", "--target", "onnx", "--out", str(tmp_path / "o"))
    assert code == 1 and "torch.export cannot trace" in last["error"] and "m.py:5" in last["error"]
    assert not (tmp_path / "o").exists()


def test_bundle_commands_have_their_own_group_and_the_old_zoo_spellings_still_work(tmp_path):
    """`effai bundle pack|keygen|sign|verify|unpack|install|archive`; `effai zoo ...` keeps them as hidden aliases for
    one release (same command, same result)."""
    code, _, out, _ = run_cli("bundle", "--help")
    assert code == 0 and all(c in out for c in ("pack", "keygen", "sign", "verify", "unpack", "install", "archive"))
    code, _, out, _ = run_cli("zoo", "--help")
    assert code == 0 and "keygen" not in out and "list" in out
    for group in ("bundle", "zoo"):
        key = tmp_path / group / "k.pem"
        code, last, _, err = run_cli(group, "keygen", str(key), "--json")
        assert code == 0 and last["ok"] and key.is_file() and key.with_name("k.pem.pub").is_file(), err


def test_exports_of_different_things_never_share_a_folder_silently(tmp_path):
    """The default folder name carries precision, input size, batch, I/O dtype and non-default weights; an artifact
    exported from something else is replaced only with --force, and the manifest says what it replaced."""
    from effai import zoo
    from effai.export.artifact_dir import artifact_name

    loaded = zoo.create("ghostnetv3_050")
    names = {artifact_name(loaded, "onnx", "fp32", (1, 3, 224, 224)), artifact_name(loaded, "onnx", "fp32", (1, 3, 64, 64)),
             artifact_name(loaded, "onnx", "int8", (1, 3, 224, 224)), artifact_name(loaded, "tflite", "int8", (1, 3, 224, 224), "int8"),
             artifact_name(loaded, "onnx", "fp32", (2, 3, 224, 224))}
    assert len(names) == 5 and "ghostnetv3_050-onnx" in names and "ghostnetv3_050-onnx-64x64" in names
    trained = zoo.LoadedModel(loaded.model, loaded.card, zoo.WeightsInfo("runs/x/model.safetensors", "ab" * 32))
    assert artifact_name(trained, "onnx", "fp32", (1, 3, 224, 224)) == "ghostnetv3_050-onnx-wabababab"

    out = tmp_path / "art"
    base = ["export", "ghostnetv3_050.digits", "--target", "onnx", "--out", str(out), "--no-verify", "--eval", "none"]
    assert run_cli(*base)[0] == 0
    assert run_cli(*base)[0] == 0                                    # the same export again: a silent update
    code, last, _, _ = run_cli(*base, "--input-size", "96")
    assert code == 2 and "holds another export" in last["error"] and "--force" in last["error"]
    code, last, _, err = run_cli(*base, "--input-size", "96", "--force", "--json")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 1, 96, 96]
    assert any(w.startswith("replaced the artifact") for w in manifest["warnings"])


def test_benchmark_exports_checks_and_times_every_target_x_precision_in_one_table(tmp_path):
    """`effai benchmark`: one row per target x precision; a precision a target does not take and a runtime this
    machine lacks (Core ML off macOS) are rows saying why, not failures; timed rows carry median/p90 and the ratio
    to the fastest."""
    import platform

    code, last, out, err = run_cli("benchmark", "ghostnetv3_050.digits", "--targets", "onnx,coreml", "--quantize",
                                   "fp32,palette4", "--runs", "5", "--out", str(tmp_path / "bm"))
    assert code == 0, err[-2000:]
    rows = {(r["target"], r["precision"]): r for r in last["rows"]}
    onnx = rows[("onnx", "fp32")]
    assert onnx["status"] == "timed" and onnx["parity"] == "pass" and onnx["median_ms"] > 0 and onnx["x_fastest"] == 1.0
    assert onnx["top1"] > 0.97 and onnx["mb"] > 1
    assert rows[("onnx", "palette4")]["status"] == "skipped" and "onnx takes" in rows[("onnx", "palette4")]["reason"]
    if platform.system() != "Darwin":
        assert rows[("coreml", "palette4")]["status"] == "not-timed" and "macOS" in rows[("coreml", "palette4")]["reason"]
        assert rows[("coreml", "palette4")]["mb"] < rows[("coreml", "fp32")]["mb"] / 3
    assert "effai benchmark ghostnetv3_050.digits" in out
