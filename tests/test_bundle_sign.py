"""Ed25519 keys, signing and `verify` on small hand-made bundles (no exports): every tampering is named."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from effai.bundle import index as index_mod
from effai.bundle import sign
from effai.errors import EffaiError, UsageError

ARTIFACTS = (("onnx", "fp32", "model.onnx"), ("tflite", "fp32", "model.tflite"), ("coreml", "fp16", "model.mlpackage"),
             ("onnx", "int8", "model.onnx"))


def make_bundle(root: Path, artifacts=ARTIFACTS, model: str = "tinynet.digits") -> Path:
    """A bundle laid out like `effai zoo pack` writes one, with small fake artifact files; indexed and carded the
    real way (sign.reindex: bundle.json, MODEL_CARD.md, bundle.json again)."""
    root.mkdir(parents=True)
    entries = []
    for target, precision, model_file in artifacts:
        d = root / f"{target}-{precision}"
        d.mkdir()
        if model_file.endswith(".mlpackage"):
            (d / model_file / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
            (d / model_file / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0"}\n')
            (d / model_file / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"\x08\x09spec" * 50)
            (d / model_file / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(os.urandom(512))
        else:
            (d / model_file).write_bytes(f"{target}-{precision}".encode() + os.urandom(256))
        (d / "parity.npz").write_bytes(os.urandom(128))
        (d / "export.log").write_text(f"exported {target} {precision}\n")
        files = [{"path": p.relative_to(d).as_posix(), "bytes": p.stat().st_size} for p in sorted(d.rglob("*"))
                 if p.is_file()]
        manifest = {"schema": "effai.manifest/1", "model": {"name": model, "family": "tinynet"}, "target": target,
                    "precision": precision, "model_file": model_file, "status": "pass", "files": files,
                    "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32", "layout": "NCHW"}],
                    "outputs": [{"name": "logits", "shape": [1, 3], "dtype": "float32"}],
                    "parity": {"status": "pass", "max_abs_err": 1e-6, "cosine": 1.0, "runtime": "fake"}}
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        entries.append({"target": target, "precision": precision, "dir": d.name,
                        "model_file": f"{d.name}/{model_file}", "status": "pass", "error": None,
                        "parity": {"status": "pass", "max_abs_err": 1e-6}, "accuracy": None,
                        "bytes": sum(f["bytes"] for f in files if f["path"].startswith(model_file))})
    (root / "labels.txt").write_text("zero\none\ntwo\n")
    (root / "preprocessing.json").write_text(json.dumps({"input_size": [8, 8], "channels": 1}) + "\n")
    index = {"effai_version": "0.1.0", "status": "complete", "signing": None, "deterministic": {},
             "model": {"name": model, "family": "tinynet", "task": "image-classification", "params": 1234,
                       "macs": 5678, "input_size": [1, 8, 8], "num_classes": 3, "license": "MIT",
                       "weights": {"source": "test", "sha256": "0" * 64, "available": "user"},
                       "description": "a hand-made test bundle", "trained": None},
             "artifacts": entries}
    sign.reindex(root, index)
    return root


def flip_byte(path: Path, at: int | None = None) -> bytes:
    data = path.read_bytes()
    i = len(data) // 2 if at is None else at
    path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    return data


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return sign.keygen(d / "signer.key"), sign.keygen(d / "other.key")


@pytest.fixture
def signed(tmp_path, keys):
    root = make_bundle(tmp_path / "bundle")
    sign.sign_bundle(root, Path(keys[0]["private"]))
    return root


# ----------------------------------------------------------------------------------------------------- keys


def test_keygen_writes_private_0600_and_pem_public(tmp_path):
    info = sign.keygen(tmp_path / "k" / "signing.key")
    priv, pub = Path(info["private"]), Path(info["public"])
    assert pub.name == "signing.key.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    block = sign.public_block(priv)
    assert block == sign.public_block(pub)
    assert block["algorithm"] == "ed25519" and block["key_id"] == info["key_id"] and len(block["key_id"]) == 16
    assert len(base64.b64decode(block["public_key"])) == 32
    with pytest.raises(UsageError, match="already exists"):
        sign.keygen(priv)
    again = sign.keygen(priv, force=True)
    assert again["key_id"] != info["key_id"]


def test_key_files_in_other_formats_and_bad_ones(tmp_path, keys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    block = sign.public_block(Path(keys[0]["public"]))
    raw = tmp_path / "raw.pub"
    raw.write_text(block["public_key"] + "\n")                  # the base64 from a bundle's signing block
    assert sign.public_block(raw) == block
    ssh = tmp_path / "id.pub"
    ssh.write_bytes(sign.load_public(Path(keys[0]["public"])).public_bytes(serialization.Encoding.OpenSSH,
                                                                             serialization.PublicFormat.OpenSSH))
    assert sign.public_block(ssh) == block
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello, I am not a key\n")
    with pytest.raises(UsageError, match="not an Ed25519 public key"):
        sign.load_public(garbage)
    with pytest.raises(UsageError, match="does not exist"):
        sign.load_public(tmp_path / "nope.pub")
    with pytest.raises(UsageError, match="is a public key"):
        sign.load_private(Path(keys[0]["public"]))
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(UsageError, match="Ed25519"):
        sign.load_private(ec_key)
    with pytest.raises(UsageError, match="Ed25519"):
        sign.load_public(ec_key)


# --------------------------------------------------------------------------------------------- round trip


def test_sign_verify_round_trip(signed, keys):
    sig = (signed / "bundle.sig").read_text()
    assert len(base64.b64decode(sig.strip(), validate=True)) == 64
    index = index_mod.read(signed)
    assert index["signing"]["key_id"] == keys[0]["key_id"]
    assert "key id `" + keys[0]["key_id"] in (signed / "MODEL_CARD.md").read_text()   # the card names the key
    result = sign.verify(signed)
    assert result.ok and result.problems == [] and result.signature == "valid" and not result.trusted
    assert result.key_id == keys[0]["key_id"]
    assert any("not checked against a key you trust: pass --pubkey" in n for n in result.notes)
    trusted = sign.verify(signed, Path(keys[0]["public"]))
    assert trusted.ok and trusted.trusted and trusted.notes == []
    assert sign.verify(signed, Path(keys[0]["private"])).trusted     # a private key works: its public half is used
    assert result.files == len(index["files"]) > 10


def test_flipped_byte_in_every_file_is_named(signed, keys):
    listed = [f["path"] for f in index_mod.read(signed)["files"]]
    assert "onnx-fp32/model.onnx" in listed and "coreml-fp16/model.mlpackage/Manifest.json" in listed
    for rel in listed:
        original = flip_byte(signed / rel)
        result = sign.verify(signed, Path(keys[0]["public"]))
        (signed / rel).write_bytes(original)
        assert not result.ok, rel
        assert len(result.problems) == 1 and result.problems[0].startswith(f"changed: {rel} "), (rel, result.problems)
        assert result.signature == "valid"          # bundle.json itself is intact: exactly the file is blamed
    assert sign.verify(signed).ok


def test_flipped_byte_in_bundle_json_or_sig_invalidates_the_signature(signed, keys):
    for name in ("bundle.json", "bundle.sig"):
        original = flip_byte(signed / name, at=10)
        result = sign.verify(signed, Path(keys[0]["public"]))
        (signed / name).write_bytes(original)
        assert not result.ok and result.signature == "invalid", name
        assert not result.trusted
    assert sign.verify(signed).ok


def test_missing_and_extra_files(signed):
    (signed / "onnx-fp32" / "parity.npz").unlink()
    (signed / "tflite-fp32" / "notes.txt").write_text("smuggled in\n")
    result = sign.verify(signed)
    assert not result.ok
    assert result.problems == ["missing: onnx-fp32/parity.npz", "not in the index: tflite-fp32/notes.txt"]


def test_rewritten_index_with_matching_hashes_still_fails_the_signature(signed, keys):
    """An attacker who swaps a file and updates its hash in bundle.json: hashes agree, the signature does not."""
    (signed / "labels.txt").write_text("zero\none\nTWO\n")
    index = index_mod.read(signed)
    index_mod.write(signed, index)
    result = sign.verify(signed, Path(keys[0]["public"]))
    assert index_mod.check(signed) == []
    assert not result.ok and result.signature == "invalid"
    assert "does not match bundle.json" in result.problems[0]


def test_wrong_key_names_both_key_ids(signed, keys):
    result = sign.verify(signed, Path(keys[1]["public"]))
    assert not result.ok and not result.trusted and result.signature == "valid"
    assert result.problems == [f"signed by key_id {keys[0]['key_id']}, not by the key you gave ({keys[1]['key_id']})"]


def test_attacker_resigning_with_own_key_is_caught_by_pubkey(signed, keys):
    (signed / "labels.txt").write_text("evil\n")
    index_mod.write(signed, index_mod.read(signed))
    with pytest.raises(EffaiError, match="current signature is invalid"):   # effai will not bless the change ...
        sign.sign_bundle(signed, Path(keys[1]["private"]))
    sign.sign_bundle(signed, Path(keys[1]["private"]), force=True)        # ... but an attacker can sign anyway
    assert sign.verify(signed).ok                             # self-consistent ...
    result = sign.verify(signed, Path(keys[0]["public"]))     # ... but not by the key the user trusts
    assert not result.ok and "not by the key you gave" in result.problems[0]


def test_unsigned_and_removed(tmp_path, keys):
    root = make_bundle(tmp_path / "b")
    result = sign.verify(root)
    assert result.ok and result.signature == "unsigned" and result.key_id is None
    assert any("unsigned: its hashes catch accidental damage only" in n for n in result.notes)
    with_key = sign.verify(root, Path(keys[0]["public"]))
    assert not with_key.ok and "unsigned" in with_key.problems[0]
    sign.sign_bundle(root, Path(keys[0]["private"]))
    (root / "bundle.sig").unlink()
    removed = sign.verify(root)
    assert not removed.ok and removed.signature == "removed" and "bundle.sig is missing" in removed.problems[0]
    assert "bundle sign" not in removed.problems[0]          # never advises re-signing a bundle you did not build
    index = index_mod.read(root)
    index["signing"] = None
    index_mod.write(root, index)
    (root / "bundle.sig").write_text(base64.b64encode(b"x" * 64).decode() + "\n")
    orphan = sign.verify(root)
    assert not orphan.ok and orphan.signature == "invalid" and "names no signing key" in orphan.problems[0]


def test_sign_refuses_without_block_or_on_tampered_bundle(tmp_path, keys):
    root = make_bundle(tmp_path / "b")
    with pytest.raises(UsageError, match="has no signing block"):
        sign.sign(root, Path(keys[0]["private"]))
    with pytest.raises(UsageError, match="is a public key"):
        sign.sign_bundle(root, Path(keys[0]["public"]))
    flip_byte(root / "onnx-fp32" / "model.onnx")
    with pytest.raises(EffaiError, match="changed: onnx-fp32/model.onnx") as e:
        sign.sign_bundle(root, Path(keys[0]["private"]))
    assert not isinstance(e.value, UsageError)
    assert not (root / "bundle.sig").exists() and index_mod.read(root)["signing"] is None


def test_newer_schema_asks_to_upgrade(signed):
    index = json.loads((signed / "bundle.json").read_text())
    index["schema"] = "effai.bundle/7"
    (signed / "bundle.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match=r"newer effai \(effai.bundle/7.*pip install -U effai"):
        sign.verify(signed)


@pytest.mark.parametrize("files", [["x"], {"a": 1}, [{"path": "labels.txt"}], [{"path": "../x", "bytes": 1,
                                                                                   "sha256": "0" * 64}]])
def test_malformed_index_is_a_one_line_refusal(signed, files):
    index = json.loads((signed / "bundle.json").read_text())
    index["files"] = files
    (signed / "bundle.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="bundle.json is damaged|unsafe path") as e:
        sign.verify(signed)
    assert "\n" not in str(e.value)


def test_not_a_bundle(tmp_path):
    with pytest.raises(UsageError, match="no bundle.json"):
        sign.verify(tmp_path)


# ------------------------------------------------------------------------------------------------------ CLI

CLI = """
import sys
import effai.cli as cli
sys.argv = ["effai", *sys.argv[1:]]
cli.main()
"""


def run_zoo(*args: str):
    """`effai zoo ARGS` in a real process: (exit code, last-line JSON, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-c", CLI, "zoo", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"}, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    last = json.loads(lines[-1]) if lines else None
    return proc.returncode, last, proc.stdout, proc.stderr


def test_cli_keygen_sign_verify_exit_codes(tmp_path):
    root = make_bundle(tmp_path / "b")
    code, out, _, err = run_zoo("keygen", str(tmp_path / "k.key"))
    assert code == 0 and out["ok"] and Path(out["public"]).is_file(), err
    code, out, _, err = run_zoo("sign", str(root), "--key", str(tmp_path / "k.key"), "--json")
    assert code == 0 and out["key_id"], err
    code, out, _, err = run_zoo("verify", str(root), "--pubkey", str(tmp_path / "k.key.pub"))
    assert code == 0 and out["ok"] and out["signature"] == "valid" and out["trusted"], err
    assert "all" in err and "files match bundle.json" in err
    flip_byte(root / "tflite-fp32" / "model.tflite")
    code, out, _, err = run_zoo("verify", str(root), "--json")
    assert code == 1 and not out["ok"] and out["problems"][0].startswith("changed: tflite-fp32/model.tflite")
    assert out["error"].startswith("changed: tflite-fp32/model.tflite") and err == ""
    (tmp_path / "bad.pub").write_text("nope\n")
    code, out, _, err = run_zoo("verify", str(root), "--pubkey", str(tmp_path / "bad.pub"))
    assert code == 2 and "not an Ed25519 public key" in out["error"]
    code, out, _, _ = run_zoo("verify", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in out["error"]
    code, out, _, _ = run_zoo("keygen", str(tmp_path / "k.key"))
    assert code == 2 and "already exists" in out["error"]


# ------------------------------------------------------------------------------- issue 21: stripped signatures


def strip_signature(root: Path, drop_block: bool = False) -> None:
    """The attack: change a file, recompute the hashes in bundle.json, delete bundle.sig (and maybe the block)."""
    (root / "labels.txt").write_text("evil\none\ntwo\n")
    index = index_mod.read(root)
    if drop_block:
        index["signing"] = None
    index_mod.write(root, index)
    (root / "bundle.sig").unlink()


def test_removed_signature_is_tampered_and_is_not_re_signed(signed, keys, tmp_path):
    from effai.bundle import install

    strip_signature(signed)
    before = (signed / "bundle.json").read_bytes()
    pub, priv = Path(keys[0]["public"]), Path(keys[0]["private"])
    for result in (sign.verify(signed), sign.verify(signed, pub)):
        assert not result.ok and not result.trusted and result.signature == "removed"
        assert result.problems[0].startswith("signature removed") and "bundle sign" not in result.problems[0]
    with pytest.raises(EffaiError, match="refusing to sign .*signature removed.*--force only if you packed") as e:
        sign.sign_bundle(signed, priv)
    assert not isinstance(e.value, UsageError)
    assert (signed / "bundle.json").read_bytes() == before and not (signed / "bundle.sig").exists()
    with pytest.raises(EffaiError, match="signature removed"):
        install.install(signed, tmp_path / "app", "onnx", precision="fp32")
    with pytest.raises(EffaiError, match="signature removed"):
        install.unpack(signed, tmp_path / "all")
    assert not (tmp_path / "app").exists() and not (tmp_path / "all").exists()
    sign.sign_bundle(signed, priv, force=True)           # the packer's way out after an interrupted command
    assert sign.verify(signed, pub).trusted


def test_stripped_signing_block_leaves_an_unsigned_bundle_that_is_never_trusted(signed, keys, tmp_path):
    """Without --pubkey nothing can tell this from an honest unsigned bundle; with it, it never passes."""
    from effai.bundle import install

    strip_signature(signed, drop_block=True)
    pub = Path(keys[0]["public"])
    plain = sign.verify(signed)
    assert plain.ok and plain.signature == "unsigned" and not plain.trusted
    assert any("unsigned" in n and "--pubkey" in n for n in plain.notes)
    with_key = sign.verify(signed, pub)
    assert not with_key.ok and not with_key.trusted and "unsigned" in with_key.problems[0]
    with pytest.raises(EffaiError, match="unsigned"):
        install.install(signed, tmp_path / "app", "onnx", precision="fp32", pubkey=pub)
    with pytest.raises(EffaiError, match="fails verification"):
        install.unpack(signed, tmp_path / "all", pubkey=pub)
    info = install.install(signed, tmp_path / "app", "onnx", precision="fp32")
    assert info["signature"] == "unsigned" and not info["trusted"]
    assert any(n.startswith("the bundle is unsigned") for n in info["notes"])


def test_re_signing_over_another_key_says_so(signed, keys):
    info = sign.sign_bundle(signed, Path(keys[1]["private"]))
    assert info["replaced"] == keys[0]["key_id"] and info["key_id"] == keys[1]["key_id"]
    assert "replaced" not in sign.sign_bundle(signed, Path(keys[1]["private"]))


def test_cli_removed_signature(signed, keys, tmp_path):
    strip_signature(signed)
    code, out, _, err = run_zoo("sign", str(signed), "--key", keys[0]["private"], "--json")
    assert code == 1 and "signature removed" in out["error"] and not (signed / "bundle.sig").exists(), err
    code, out, _, err = run_zoo("verify", str(signed), "--pubkey", keys[0]["public"], "--json")
    assert code == 1 and out["signature"] == "removed" and not out["trusted"]
    assert out["error"].startswith("signature removed") and "bundle sign" not in out["error"]
    code, out, _, err = run_zoo("install", str(signed), "--into", str(tmp_path / "app"), "--target", "onnx",
                                "--precision", "fp32", "--json")
    assert code == 1 and "signature removed" in out["error"] and not (tmp_path / "app").exists()
    index = index_mod.read(signed)
    index["signing"] = None
    index_mod.write(signed, index)
    code, out, _, err = run_zoo("install", str(signed), "--into", str(tmp_path / "app"), "--target", "onnx",
                                "--precision", "fp32")
    assert code == 0 and out["signature"] == "unsigned" and "the bundle is unsigned" in err


def test_archive_refuses_a_removed_signature(signed, tmp_path):
    from effai.bundle import archive

    strip_signature(signed)
    with pytest.raises(EffaiError, match="refusing to archive .*signature removed"):
        archive.make_archive(signed, tmp_path / "b.zip")
    assert not (tmp_path / "b.zip").exists()
