"""Hostile and malformed input files (issue 21 item 4): each one ends in a clear, bounded UsageError (exit 2) or a
failed check naming the file, never a hang, a huge allocation, code execution or "internal error".

Every file here is crafted in tmp_path in a few bytes: no export, no training."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from effai import zoo
from effai.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: int = 300) -> tuple[int, dict | None, str]:
    """`effai ARGS` in a real process: (exit code, last JSON line, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "effai", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        last = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        last = None
    return proc.returncode, last, proc.stderr


def assert_usage(code: int, last: dict | None, err: str, *needles: str) -> None:
    assert code == 2, err[-2000:]
    assert last is not None and last["ok"] is False and last["exit_code"] == 2, err[-2000:]
    assert "internal error" not in err and "Traceback" not in err
    for n in needles:
        assert n in last["error"], (n, last["error"])


# ------------------------------------------------------------------------------------------- checkpoint cards

def crafted_checkpoint(path: Path, card: dict, tensors: dict | None = None) -> Path:
    full = {"name": "x", "family": "x", "mean": [0.5], "std": [0.5], "num_classes": 10, **card}
    save_file(tensors or {"w": torch.zeros(1)}, str(path), metadata={"effai.card": json.dumps(full)})
    return path


@pytest.mark.parametrize("card,needle", [
    # mixer_pico at 128x128 with patch 1: 16384 tokens, token-mixing MLPs of 1.6G parameters (6.4 GB)
    ({"source": "effai:mixer_pico", "input_size": [3, 128, 128], "arch_kwargs": {"patch_size": 1}},
     "values but the file holds 1"),
    # 4096 input channels into vit_small's patch embedding: 100M parameters
    ({"source": "effai:vit_small", "input_size": [4096, 64, 64]}, "values but the file holds 1"),
    ({"source": "timm:resnet18", "input_size": [3, 32, 32], "num_classes": 65536}, "values but the file holds 1"),
    ({"source": "timm:resnet18", "input_size": [65536, 4096, 4096]}, "over effai's limit"),
    ({"source": "timm:resnet18", "input_size": "abc"}, "malformed effai.card"),
    ({"source": "timm:resnet18", "input_size": [3, 32, 32], "mean": "x"}, "malformed effai.card"),
])
def test_crafted_card_is_refused_before_anything_is_allocated(tmp_path, card, needle):
    path = crafted_checkpoint(tmp_path / "crafted.safetensors", card)
    assert path.stat().st_size < 1000
    with pytest.raises(UsageError, match=needle):
        zoo.create(weights=path)


def test_deeply_nested_card_metadata_is_a_usage_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"effai.card": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(UsageError, match="nested too deeply"):
        zoo.create(weights=path)


def test_card_matching_its_tensors_still_loads(tmp_path):
    card = zoo.CARDS.get("vit_pico").with_(input_size=(1, 16, 16), num_classes=3, label_set=None,
                                           extra={"arch_kwargs": {"patch_size": 4}})
    model = zoo.build(card)
    path = crafted_checkpoint(tmp_path / "ok.safetensors",
                              {"name": "mine", "source": card.source, "input_size": [1, 16, 16], "num_classes": 3,
                               "arch_kwargs": {"patch_size": 4}}, dict(model.state_dict()))
    loaded = zoo.create(weights=path)
    assert loaded.card.input_size == (1, 16, 16) and not loaded.random_init


def test_crafted_card_over_the_cli_exits_2(tmp_path):
    path = crafted_checkpoint(tmp_path / "crafted.safetensors",
                              {"source": "effai:mixer_pico", "input_size": [3, 128, 128],
                               "arch_kwargs": {"patch_size": 1}})
    code, last, err = cli("export", "--weights", str(path), "--target", "onnx", "--out", str(tmp_path / "o"))
    assert_usage(code, last, err, "values but the file holds 1", str(path))


# ------------------------------------------------------------------------------------------- pickles

def test_pickle_with_a_payload_is_refused_with_a_whole_message(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    # protocol 4 (STACK_GLOBAL + FRAME): torch's refusal names an opcode, not a global, and once cut mid-sentence
    path.write_bytes(b"\x80\x04\x95\x30\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94"
                     + b"\x8c" + bytes([len(f"touch {marker}")]) + f"touch {marker}".encode() + b"\x94\x85\x94R\x94.")
    code, last, err = cli("export", "mobilenetv3_small_100", "--weights", str(path), "--target", "onnx",
                          "--out", str(tmp_path / "o"))
    assert_usage(code, last, err, "refusing to unpickle", str(path))
    assert last["error"].rstrip().endswith("where it came from")
    assert "Weights only load failed" not in last["error"] and not marker.exists()


# ------------------------------------------------------------------------------------------- --model-def

def test_model_def_factory_that_raises_is_a_usage_error(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("def make():\n    raise RuntimeError('forgot the weights')\n")
    code, last, err = cli("export", "--model-def", f"{f}:make", "--target", "onnx", "--out", str(tmp_path / "o"))
    assert_usage(code, last, err, str(f), "make()", "RuntimeError: forgot the weights")


@pytest.mark.parametrize("shape,ok", [("'abc'", False), ("(3, 0, 224)", False), ("(3, 224)", False),
                                       ("(2, 3, 224, 224)", False), ("(3, 99999, 99999)", False),
                                       ("(1, 3, 32, 32)", True), ("[3, 32, 32]", True)])
def test_model_def_input_shape_is_checked(tmp_path, shape, ok):
    f = tmp_path / "net.py"
    f.write_text(f"import torch\nINPUT_SHAPE = {shape}\ndef make():\n    return torch.nn.Flatten()\n")
    if ok:
        assert zoo.create(model_def=f"{f}:make").card.input_size == (3, 32, 32)
        return
    with pytest.raises(UsageError, match=r"INPUT_SHAPE .* is not valid.*\(3, 224, 224\) or \(1, 3, 224, 224\)") as e:
        zoo.create(model_def=f"{f}:make")
    assert str(f) in str(e.value)


def test_model_def_input_shape_over_the_cli(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("import torch\nINPUT_SHAPE = 'abc'\ndef make():\n    return torch.nn.Flatten()\n")
    code, last, err = cli("export", "--model-def", f"{f}:make", "--target", "onnx", "--out", str(tmp_path / "o"))
    assert_usage(code, last, err, str(f), "INPUT_SHAPE", "(3, 224, 224)")


# ------------------------------------------------------------------------------------------- artifact manifests

def entry(root: Path, rel: str, target: Path | None = None) -> dict:
    p = target or root / rel
    return {"path": rel, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def fake_artifact(root: Path, model_file: str = "model.onnx", files: list | None = None, more: tuple = (),
                  extra: dict | None = None) -> Path:
    """A hand-written artifact dir: a model file (junk bytes) and a manifest listing it with its real hash (or
    `files`), plus the entries `more`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"not really onnx")
    files = [*(files if files is not None else [entry(root, "model.onnx")]), *more]
    m = {"schema": "effai.manifest/1", "target": "onnx", "precision": "fp32", "model_file": model_file,
         "model": {"name": "fake"}, "inputs": [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32",
                                                "layout": "NCHW"}],
         "outputs": [], "files": files, **(extra or {})}
    (root / "manifest.json").write_text(json.dumps(m))
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    p = tmp_path / "outside.bin"
    p.write_bytes(b"a file outside the artifact")
    return p


def test_manifest_pointing_outside_is_refused_by_verify_and_bench(tmp_path, outside):
    art = tmp_path / "art"
    art.mkdir()
    fake_artifact(art, model_file=str(outside), files=[entry(art, str(outside), outside)])
    code, last, err = cli("verify", str(art))
    assert code == 1 and last["ok"] is False and last["hashes"] == "fail" and "internal error" not in err
    assert any("not a path inside the directory" in p for p in last["hash_problems"])
    assert any("not in the manifest: model.onnx" in p for p in last["hash_problems"])
    code, last, err = cli("bench", str(art), "--runs", "1", "--warmup", "0", "--cooldown", "0", "--idle", "0",
                          "--out", str(tmp_path / "b.json"))
    assert_usage(code, last, err, "model_file", "not a path inside the artifact directory")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("how", ["dotdot", "symlink", "unlisted_model", "unlisted_extra"])
def test_escaping_or_unhashed_paths_are_refused(tmp_path, outside, how):
    from effai.device_bench import artifact as artifact_mod
    from effai.export.verify import verify

    art = tmp_path / "art"
    art.mkdir()
    if how == "dotdot":
        fake_artifact(art, more=(entry(art, "../outside.bin", outside),))
        needle = "refused: ../outside.bin (not a path inside"
    elif how == "symlink":
        (art / "weights.bin").symlink_to(outside)
        fake_artifact(art, more=(entry(art, "weights.bin", outside),))
        needle = "refused: weights.bin (not a path inside"
    elif how == "unlisted_model":
        fake_artifact(art, files=[])
        needle = "not among the files the manifest hashes"
    else:
        fake_artifact(art)
        (art / "payload.so").write_bytes(b"\x7fELF")
        needle = "not in the manifest: payload.so"
    report = verify(art)
    assert report["hashes"] == "fail" and any(needle in p for p in report["hash_problems"]), report
    with pytest.raises(UsageError, match=re.escape(needle)):
        artifact_mod.load(art)


def test_deeply_nested_manifest_is_a_usage_error_for_verify_and_bench(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    for args in (("verify", str(art)), ("bench", str(art), "--out", str(tmp_path / "b.json"))):
        code, last, err = cli(*args)
        assert_usage(code, last, err, "nested too deeply")


def test_edited_parity_fields_are_bounded(tmp_path):
    from effai.export.verify import parity_samples

    art = fake_artifact(tmp_path / "art")
    m = {"parity": {"data": "parity.npz", "samples": 10**12, "noise_seed": 0, "batch": 1},
         "preprocessing": {"channels": 3, "input_size": [8, 8], "mean": [0.5], "std": [0.5]}}
    np.savez(art / "parity.npz", photos_u8=np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(UsageError, match="parity samples"):
        parity_samples(art, m)
    m["parity"].update(samples=2, data="/etc/hostname")
    with pytest.raises(UsageError, match="not a file inside"):
        parity_samples(art, m)
    m["parity"]["data"] = "parity.npz"
    del m["preprocessing"]["channels"]
    with pytest.raises(UsageError, match="missing or malformed field"):
        parity_samples(art, m)


# ------------------------------------------------------------------------------------------- bench --out

@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_bench_out_unwritable_is_refused_before_timing(tmp_path, where):
    art = fake_artifact(tmp_path / "art")
    if where == "proc":
        out = Path("/proc/effai-no-such-dir/bench.json")
    else:
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "bench.json"
    code, last, err = cli("bench", str(art), "--runs", "1", "--warmup", "0", "--cooldown", "0", "--idle", "0",
                          "--out", str(out))
    assert_usage(code, last, err, "cannot write the bench report", str(out))
    assert "threads=" not in err    # no measurement started


# ------------------------------------------------------------------------------------------- image folders, npz

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels (its pixel data is a few bytes: never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def image_folder(root: Path) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 20, 200)).save(root / c / f"{i}.png")
    return root


def test_png_declaring_a_huge_size_is_refused_before_decoding(tmp_path):
    from effai.data import datasets as data

    root = image_folder(tmp_path / "imgs")
    (root / "a" / "bomb.png").write_bytes(png_header(30000, 30000))
    with pytest.raises(UsageError, match=r"bomb\.png declares more pixels than effai decodes .*900000000 pixels"
                                         r".*limit is 89,478,485"):
        data.load(str(root), 8, 3)
    (root / "a" / "bomb.png").write_bytes(png_header(10000, 10000))   # between PIL's warning and error bounds
    with pytest.raises(UsageError, match=r"bomb\.png declares more pixels .*100000000 pixels"):
        data.load(str(root), 8, 3)


def test_fifo_named_like_an_image_is_skipped_with_a_warning(tmp_path):
    root = image_folder(tmp_path / "imgs")
    os.mkfifo(root / "a" / "x.png")
    # In a child process: before the fix, opening the FIFO blocked forever.
    code = ("import warnings\nfrom effai.data import datasets as data\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            f"    d = data.load({str(root)!r}, 8, 3)\n"
            "print(len(d), [str(x.message) for x in w if 'not regular files' in str(x.message)])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("4 [") and "skipped 1 image name(s)" in proc.stdout


def npz_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """An .npz whose x.npy header declares `shape` uint8 (no data follows) and a small y."""
    import io

    from numpy.lib import format as npf

    head = io.BytesIO()
    npf.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": shape})
    y = io.BytesIO()
    np.save(y, np.zeros(2, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", head.getvalue())
        z.writestr("y.npy", y.getvalue())
    return path


def test_npz_header_declaring_931_gib_is_refused_before_reading(tmp_path):
    from effai.data import datasets as data

    path = npz_declaring(tmp_path / "huge.npz", (1_000_000, 1000, 1000))
    with pytest.raises(UsageError, match=r"declares 931\.3 GiB of arrays .* over effai's limit of"):
        data.load(str(path), 8, 1)


@pytest.mark.parametrize("kind", ["huge", "empty", "not_zip", "pickled"])
def test_bad_npz_over_the_cli_exits_2(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    if kind == "huge":
        npz_declaring(path, (1_000_000, 1000, 1000))
        needle = "over effai's limit"
    elif kind == "empty":
        path.write_bytes(b"")
        needle = "empty file (0 bytes)"
    elif kind == "not_zip":
        path.write_bytes(b"hello, not a zip")
        needle = "not a readable .npz"
    else:
        np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
        needle = "holds Python objects"
    code, last, err = cli("train", "supervised", "--data", str(path), "--student", "vit_pico", "--epochs", "1",
                          "--out", str(tmp_path / "run"))
    assert_usage(code, last, err, str(path), needle)


def test_npz_labels_and_dtypes_are_checked(tmp_path):
    from effai.data import datasets as data

    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 8, 8, 1), np.uint8), y=np.array([0, 70_000]))
    with pytest.raises(UsageError, match="over effai's limit of 65536 classes"):
        data.load(str(path), 8, 1)
    np.savez(path, x=np.zeros((2, 8, 8, 1), np.complex64), y=np.array([0, 1]))
    with pytest.raises(UsageError, match="need uint8"):
        data.load(str(path), 8, 1)
    np.savez(path, x=np.full((2, 8, 8, 1), 300, np.int32), y=np.array([0, 1]))
    assert int(data.load(str(path), 8, 1).x.max()) == 255
