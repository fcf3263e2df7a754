"""Usage errors caught before the expensive work (issue 20): `effai export --calib` that is no calibration source and
`--weights` that is no checkpoint file, `effai bench --input-shape` on a .tflite whose file fixes (or cannot take)
the shape. Each: exit 2 and one line that names the option and what is valid; commands called in process."""

from __future__ import annotations

import pytest

from tests.helpers import call_cli

MODEL = "ghostnetv3_050.digits"


def _one_line(last: dict) -> str:
    assert last["ok"] is False and last["exit_code"] == 2, last
    msg = last["error"]
    assert "\n" not in msg and "Traceback" not in msg and "internal error" not in msg, msg
    return msg


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: the guard must refuse first."""
    from effai import zoo

    def load(*a, **k):
        raise AssertionError("the model was loaded before the usage error")

    monkeypatch.setattr(zoo, "create", load)


@pytest.mark.parametrize("kind", ["missing", "text file", "other suffix"])
def test_export_calib_that_is_no_source_is_refused_before_the_model_loads(capfd, tmp_path, no_model_load, kind):
    from effai.cli.export import export_cmd

    calib = {"missing": tmp_path / "no-such-dir", "text file": tmp_path / "notes.txt",
             "other suffix": tmp_path / "calib.npy"}[kind]
    if kind != "missing":
        calib.write_text("not images")
    code, last, _ = call_cli(capfd, export_cmd, model=MODEL, target="tflite", precision="int8", calib=str(calib),
                             out=tmp_path / "out", as_json=True)
    msg = _one_line(last)
    assert code == 2 and msg.startswith(f"--calib {calib}")
    assert ("no such file or directory" if kind == "missing" else "neither an image folder nor an .npz") in msg
    assert "auto, photos, digits, DIR, FILE.npz" in msg
    assert not (tmp_path / "out").exists()


def test_export_calib_folder_and_npz_pass_the_early_guard(capfd, tmp_path, no_model_load):
    """The guard lets the sources it names through: the next step (loading the model) is reached."""
    from effai.cli.export import export_cmd

    (tmp_path / "imgs").mkdir()
    (tmp_path / "c.NPZ").write_bytes(b"")
    for calib in (tmp_path / "imgs", tmp_path / "c.NPZ"):
        with pytest.raises(AssertionError, match="the model was loaded"):
            export_cmd(model=MODEL, target="tflite", precision="int8", calib=str(calib), out=tmp_path / "out",
                       as_json=True)


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_export_weights_that_is_not_a_file_exits_2_with_one_line(capfd, tmp_path, kind):
    from effai.cli.export import export_cmd

    weights = tmp_path / ("run" if kind == "directory" else "w.safetensors")
    if kind == "directory":
        weights.mkdir()
    code, last, _ = call_cli(capfd, export_cmd, model=MODEL, target="onnx", weights=weights,
                             out=tmp_path / "out", as_json=True)
    msg = _one_line(last)
    assert code == 2 and str(weights) in msg
    assert ("is a directory, not a checkpoint file" if kind == "directory" else "weights file not found") in msg
    assert ".safetensors" in msg and not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape,said", [
    (["2,3,8,8"], "the file fixes every dim"),                  # a static .tflite: its sizes cannot change
    (["z=1,3,8,8"], "does not have; its inputs: x"),            # an input the file does not have
    (["1,3,x,8"], "must be [NAME=]D,D,... with positive sizes"),  # not a shape
    (["1,3,0,8"], "must be [NAME=]D,D,... with positive sizes"),
])
def test_bench_input_shape_on_a_tflite_it_cannot_apply_to_exits_2_before_timing(capfd, tmp_path, shape, said):
    pytest.importorskip("ai_edge_litert")
    from effai.cli.bench import bench_cmd
    from tests.test_bench_files import _relu_tflite

    path = _relu_tflite(tmp_path / "static.tflite", [1, 3, 8, 8])
    out = tmp_path / "bench.json"
    code, last, _ = call_cli(capfd, bench_cmd, artifacts=[path], input_shape=shape, runs=2, warmup=0, cooldown=0,
                             idle=0, energy="none", out=out, as_json=True)
    msg = _one_line(last)
    assert code == 2 and said in msg and "--input-shape" in msg, msg
    assert not out.exists(), "nothing was timed or written"


@pytest.mark.parametrize("kind, file, body, command", [
    ("generation", "manifest.json", {"schema": "effai.generate/1"}, "effai generate {d} --image"),
    ("delvm", "delvm.json", {"schema": "effai.delvm/1"}, "effai generate {d} --prompt-images"),
    ("sr", "sr.json", {"spec": {}, "parts": {}, "target": "onnx"}, "effai sr {d} "),
])
def test_predict_on_another_kind_of_artifact_names_its_command(kind, file, body, command, tmp_path, capfd):
    """`effai predict` classifies; a generation, DeLVM or SR artifact gets the command that runs it, not a schema
    error that says to re-export."""
    import json

    from effai.cli.predict import predict_cmd

    d = tmp_path / kind
    d.mkdir()
    (d / file).write_text(json.dumps(body))
    img = tmp_path / "x.png"
    img.write_bytes(b"png")
    code, last, _ = call_cli(capfd, predict_cmd, artifact=d, images=[img], top_k=5, as_json=True)
    assert code == 2 and command.format(d=d) in _one_line(last), last
