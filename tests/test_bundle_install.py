"""Bundle archives (safe reading, deterministic writing), unpack and install: only verified files, all or nothing."""

from __future__ import annotations

import io
import json
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from effai.bundle import archive, install, sign
from effai.bundle import index as index_mod
from effai.errors import EffaiError, UsageError
from tests.test_bundle_sign import flip_byte, make_bundle, run_zoo


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return sign.keygen(tmp_path_factory.mktemp("key") / "signer.key")


@pytest.fixture
def bundle(tmp_path, key):
    root = make_bundle(tmp_path / "src" / "tinynet.digits")
    sign.sign_bundle(root, Path(key["private"]))
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def listing(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


# ------------------------------------------------------------------------------------------------- archives


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz", ".tgz"])
def test_archive_round_trip_and_determinism(bundle, tmp_path, suffix, key):
    a = tmp_path / f"b1{suffix}"
    info = archive.make_archive(bundle, a)
    assert info["files"] == len(tree(bundle)) and info["top"] == "tinynet.digits"
    for p in bundle.rglob("*"):                 # new mtimes, same content: the archive bytes must not change
        p.touch()
    time.sleep(0.01)
    b = tmp_path / f"b2{suffix}"
    archive.make_archive(bundle, b)
    assert a.read_bytes() == b.read_bytes()
    with archive.opened(a) as root:
        assert root.name == "tinynet.digits"
        assert tree(root) == tree(bundle)
        result = sign.verify(root, Path(key["public"]))
        assert result.ok and result.trusted
        extracted_at = root
    assert not extracted_at.exists()             # the temporary extraction is removed afterwards
    if suffix == ".zip":
        with zipfile.ZipFile(a) as zf:
            infos = zf.infolist()
            assert [i.filename for i in infos] == sorted(i.filename for i in infos)
            assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    else:
        with tarfile.open(a) as tf:
            members = tf.getmembers()
            assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
            assert {m.mtime for m in members} == {archive.DEFAULT_EPOCH}


def test_archive_of_bundle_contents_at_top_level(bundle, tmp_path):
    a = tmp_path / "flat.zip"
    with zipfile.ZipFile(a, "w") as zf:
        for rel, data in tree(bundle).items():
            zf.writestr(rel, data)
    with archive.opened(a) as root:
        assert tree(root) == tree(bundle)
        assert sign.verify(root).ok


def test_make_archive_refuses_a_tampered_bundle_and_a_path_inside(bundle, tmp_path):
    with pytest.raises(UsageError, match="inside the bundle"):
        archive.make_archive(bundle, bundle / "self.zip")
    flip_byte(bundle / "labels.txt")
    with pytest.raises(EffaiError, match="changed: labels.txt"):
        archive.make_archive(bundle, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()
    with pytest.raises(UsageError, match=r"\.zip, \.tar\.gz or \.tgz"):
        archive.make_archive(bundle, tmp_path / "x.rar")


def _zip(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    """entries: (name, data, unix mode or None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # zipfile warns about the duplicate names some tests need
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data, mode in entries:
                zi = zipfile.ZipInfo(name)
                zi.compress_type = zipfile.ZIP_DEFLATED
                if mode is not None:
                    zi.create_system = 3
                    zi.external_attr = mode << 16
                zf.writestr(zi, data)
    return path


def _tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                ti = tarfile.TarInfo(e[0])
                ti.size = len(e[1])
                tf.addfile(ti, io.BytesIO(e[1]))
    return path


def _info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = linkname
    return ti


GOOD = ("b/bundle.json", b"{}")


@pytest.mark.parametrize("name, entries, why", [
    ("dotdot.zip", [("b/bundle.json", b"{}", None), ("../evil.txt", b"x", None)], "'..'"),
    ("deep.zip", [("b/../../evil.txt", b"x", None)], "'..'"),
    ("abs.zip", [("/tmp/evil.txt", b"x", None)], "absolute path"),
    ("drive.zip", [("C:/evil.txt", b"x", None)], "absolute path"),
    ("backslash.zip", [("b\\..\\..\\evil.txt", b"x", None)], "backslash"),
    ("symlink.zip", [("b/bundle.json", b"{}", None), ("b/link", b"/etc/passwd", 0o120777)], "symlink"),
    ("fifo.zip", [("b/fifo", b"", 0o010644)], "not a regular file"),
    ("dup.zip", [("b/bundle.json", b"{}", None), ("b/bundle.json", b"{\"x\": 1}", None)], "duplicate"),
    ("under_file.zip", [("b/labels.txt", b"a", None), ("b/labels.txt/x", b"b", None)], "which is a file"),
    ("bomb.zip", [("b/zeros.bin", bytes(4 << 20), None)], "compression ratio"),
])
def test_unsafe_zip_entries_are_refused(tmp_path, name, entries, why):
    a = _zip(tmp_path / name, entries)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(UsageError, match=why) as e:
        archive.extract(a, dest)
    assert str(a) in str(e.value) and "refusing entry" in str(e.value)
    assert not dest.exists() and listing(tmp_path / "out") == []     # nothing extracted, no temp dir left
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


@pytest.mark.parametrize("name, entries, why", [
    ("dotdot.tar.gz", [GOOD, ("../evil.txt", b"x")], "'..'"),
    ("abs.tgz", [("/tmp/evil.txt", b"x")], "absolute path"),
    ("symlink.tar.gz", [GOOD, _info("b/link", tarfile.SYMTYPE, "/etc/passwd")], "symlink"),
    ("symlink_dir.tar.gz", [_info("b/up", tarfile.SYMTYPE, ".."), ("b/up/evil.txt", b"x")], "symlink"),
    ("hardlink.tar.gz", [GOOD, _info("b/hard", tarfile.LNKTYPE, "/etc/passwd")], "hardlink"),
    ("device.tar.gz", [GOOD, _info("b/null", tarfile.CHRTYPE)], "device file"),
    ("fifo.tar.gz", [GOOD, _info("b/fifo", tarfile.FIFOTYPE)], "FIFO"),
    ("dup.tar.gz", [GOOD, GOOD], "duplicate"),
    ("bomb.tar.gz", [("b/zeros.bin", bytes(4 << 20))], "compression ratio"),
])
def test_unsafe_tar_entries_are_refused(tmp_path, name, entries, why):
    a = _tar(tmp_path / name, entries)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(UsageError, match=why):
        archive.extract(a, dest)
    assert not dest.exists() and listing(tmp_path / "out") == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_total_size_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "MAX_TOTAL_BYTES", 1000)
    a = _tar(tmp_path / "big.tar.gz", [GOOD, ("b/big.bin", b"\x01" * 2000)])
    with pytest.raises(UsageError, match="add up to more than"):
        archive.entries(a)


def test_damaged_and_non_bundle_archives(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UsageError, match="cannot be read as a zip"):
        archive.entries(bad)
    a = _zip(tmp_path / "nobundle.zip", [("x/readme.txt", b"hi", None)])
    with pytest.raises(UsageError, match="holds no bundle.json"):
        with archive.opened(a):
            pass
    other = tmp_path / "bundle.rar"
    other.write_text("x")
    with pytest.raises(UsageError, match="neither a bundle directory nor"):
        with archive.opened(other):
            pass


def test_unpack_refuses_a_malicious_archive(tmp_path):
    a = _zip(tmp_path / "evil.zip", [("b/bundle.json", b"{}", None), ("../../evil.txt", b"x", None)])
    with pytest.raises(UsageError, match="'..'"):
        install.unpack(a, tmp_path / "app")
    assert not (tmp_path / "app").exists()


# -------------------------------------------------------------------------------------------------- unpack


def test_unpack_copies_the_whole_verified_bundle(bundle, tmp_path, key):
    a = tmp_path / "b.tar.gz"
    archive.make_archive(bundle, a)
    for src in (bundle, a):
        into = tmp_path / f"unpacked-{src.name}"
        info = install.unpack(src, into, pubkey=Path(key["public"]))
        assert tree(into) == tree(bundle)
        assert info["trusted"] and info["signature"] == "valid" and info["files"] == len(tree(bundle)) - 2
        assert sign.verify(into, Path(key["public"])).ok
    into = tmp_path / f"unpacked-{bundle.name}"
    with pytest.raises(UsageError, match="not empty"):
        install.unpack(bundle, into)
    install.unpack(bundle, into, force=True)      # an earlier unpack is replaced
    assert tree(into) == tree(bundle)


def test_unpack_refuses_a_tampered_bundle_and_leaves_nothing(bundle, tmp_path):
    flip_byte(bundle / "coreml-fp16" / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")
    with pytest.raises(EffaiError, match="changed: coreml-fp16/model.mlpackage/Data/com.apple.CoreML/weights"):
        install.unpack(bundle, tmp_path / "out" / "app")
    assert listing(tmp_path / "out") == []


def test_unsafe_paths_in_an_unsigned_bundle_json(tmp_path):
    root = make_bundle(tmp_path / "b")
    (tmp_path / "secret.txt").write_text("outside\n")
    index = index_mod.read(root)
    index["files"].append({"path": "../secret.txt", "bytes": 8, "sha256": "0" * 64})
    (root / "bundle.json").write_text(index_mod.dumps(index))
    with pytest.raises(EffaiError, match="unsafe path '../secret.txt'"):
        install.install(root, tmp_path / "app", "onnx", precision="fp32")
    assert not (tmp_path / "app").exists()


# ------------------------------------------------------------------------------------------------- install


def test_install_copies_only_the_targets_files(bundle, tmp_path, key):
    into = tmp_path / "MyApp" / "Models" / "digits"
    info = install.install(bundle, into, "coreml", pubkey=Path(key["public"]))
    assert info["precision"] == "fp16" and info["trusted"] and info["model_file"] == "model.mlpackage"
    got = tree(into)
    want = {"MODEL_CARD.md", "labels.txt", "preprocessing.json", "manifest.json",
            "model.mlpackage/Manifest.json", "model.mlpackage/Data/com.apple.CoreML/model.mlmodel",
            "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin", ".effai-install.json"}
    assert set(got) == want
    assert json.loads(got[".effai-install.json"])["target"] == "coreml"    # what --force may replace later
    for rel in ("MODEL_CARD.md", "labels.txt", "preprocessing.json"):
        assert got[rel] == (bundle / rel).read_bytes()
    assert got["manifest.json"] == (bundle / "coreml-fp16" / "manifest.json").read_bytes()
    assert got["model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"] == \
        (bundle / "coreml-fp16/model.mlpackage/Data/com.apple.CoreML/weights/weight.bin").read_bytes()
    assert listing(into.parent) == ["digits", *(f"digits/{p}" for p in listing(into))]   # no temp dirs left


def test_install_from_an_archive_and_precision_choice(bundle, tmp_path):
    a = tmp_path / "b.zip"
    archive.make_archive(bundle, a)
    info = install.install(a, tmp_path / "app", "onnx", precision="int8")
    assert info["precision"] == "int8"
    assert (tmp_path / "app" / "model.onnx").read_bytes() == (bundle / "onnx-int8" / "model.onnx").read_bytes()
    with pytest.raises(UsageError, match=r"several onnx artifacts: fp32 \(pass\), int8 \(pass\); choose one with "
                                         r"--precision"):
        install.install(a, tmp_path / "app2", "onnx")
    with pytest.raises(UsageError, match="no onnx artifact at precision fp16; onnx comes as: fp32, int8"):
        install.install(a, tmp_path / "app2", "onnx", precision="fp16")
    with pytest.raises(UsageError, match=r"no executorch artifact; .*it has: onnx/fp32 \(pass\)"):
        install.install(a, tmp_path / "app2", "executorch")
    assert not (tmp_path / "app2").exists()


def test_install_refuses_failed_artifacts(tmp_path):
    root = make_bundle(tmp_path / "b")
    index = index_mod.read(root)
    index["artifacts"][1].update(status="export-failed", error="converter crashed")
    index["artifacts"][3].update(status="fail", error="parity: max abs err 0.3")
    index_mod.write(root, index)
    with pytest.raises(EffaiError, match="tflite/fp32 export failed when the bundle was packed \\(converter crashed"):
        install.install(root, tmp_path / "app", "tflite")
    with pytest.raises(EffaiError, match="must not ship: parity: max abs err 0.3"):
        install.install(root, tmp_path / "app", "onnx", precision="int8")
    info = install.install(root, tmp_path / "app", "onnx")      # the one usable onnx is chosen without --precision
    assert info["precision"] == "fp32"


def test_install_refuses_a_tampered_file_and_leaves_the_destination_untouched(bundle, tmp_path, key):
    into = tmp_path / "app"
    install.install(bundle, into, "tflite")
    before = tree(into)
    flip_byte(bundle / "tflite-fp32" / "model.tflite")
    with pytest.raises(EffaiError, match="changed: tflite-fp32/model.tflite") as e:
        install.install(bundle, into, "tflite", force=True)
    assert "nothing was installed" in str(e.value)
    assert tree(into) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app", "src"]     # no staging or backup dirs left
    # a file of another target does not block installing this one
    install.install(bundle, tmp_path / "app-onnx", "onnx", precision="fp32")


def test_install_checks_the_signature(bundle, tmp_path, key):
    other = sign.keygen(tmp_path / "other.key")
    with pytest.raises(EffaiError, match="not by the key you gave"):
        install.install(bundle, tmp_path / "app", "onnx", precision="fp32", pubkey=Path(other["public"]))
    index = json.loads((bundle / "bundle.json").read_text())
    index["model"]["description"] = "edited"
    (bundle / "bundle.json").write_text(index_mod.dumps(index))
    with pytest.raises(EffaiError, match="signature invalid"):
        install.install(bundle, tmp_path / "app", "onnx", precision="fp32")
    assert not (tmp_path / "app").exists()


def test_install_refuses_to_replace_a_foreign_folder(bundle, tmp_path):
    into = tmp_path / "Resources"
    into.mkdir()
    (into / "Info.plist").write_text("mine\n")
    with pytest.raises(UsageError, match="not empty"):
        install.install(bundle, into, "onnx", precision="fp32")
    with pytest.raises(UsageError, match="not an earlier effai unpack/install"):
        install.install(bundle, into, "onnx", precision="fp32", force=True)
    assert listing(into) == ["Info.plist"]
    export_dir = tmp_path / "mymodel-onnx"           # an `effai export` artifact dir has a manifest.json too
    export_dir.mkdir()
    (export_dir / "manifest.json").write_text("{}")
    (export_dir / "model.onnx").write_bytes(b"mine")
    with pytest.raises(UsageError, match="not an earlier effai unpack/install"):
        install.install(bundle, export_dir, "onnx", precision="fp32", force=True)
    assert listing(export_dir) == ["manifest.json", "model.onnx"]


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_archive_unpack_install(bundle, tmp_path, key):
    a = tmp_path / "bundle.zip"
    code, out, _, err = run_zoo("archive", str(bundle), str(a), "--json")
    assert code == 0 and out["files"] == len(tree(bundle)), err
    code, out, _, err = run_zoo("verify", str(a), "--pubkey", key["public"])
    assert code == 0 and out["trusted"], err
    code, out, _, err = run_zoo("install", str(a), "--into", str(tmp_path / "app"), "--target", "tflite")
    assert code == 0 and out["target"] == "tflite" and "model.tflite" in out["files"], err
    code, out, _, err = run_zoo("install", str(a), "--into", str(tmp_path / "app2"), "--target", "executorch")
    assert code == 2 and "no executorch artifact" in out["error"]
    code, out, _, err = run_zoo("unpack", str(a), "--into", str(tmp_path / "whole"), "--json")
    assert code == 0 and out["files"] == len(tree(bundle)) - 2, err
    flip_byte(bundle / "labels.txt")
    code, out, _, err = run_zoo("unpack", str(bundle), "--into", str(tmp_path / "whole2"))
    assert code == 1 and "changed: labels.txt" in out["error"]
    evil = _zip(tmp_path / "evil.zip", [("b/bundle.json", b"{}", None), ("../evil.txt", b"x", None)])
    code, out, _, err = run_zoo("verify", str(evil))
    assert code == 2 and "refusing entry '../evil.txt'" in out["error"]


def test_checking_and_installing_bundles_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys; import effai.bundle.sign, effai.bundle.archive, effai.bundle.install, effai.bundle.perf, "
            "effai.bundle.model_card_md, effai.cli.bundle; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
