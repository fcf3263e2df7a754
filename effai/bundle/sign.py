"""Ed25519 signing of a bundle's index, and `verify`: every file hash plus the signature, with the culprit named.

What is signed: the exact bytes of bundle.json, which lists every other file's size and sha256, so bundle.sig covers
the whole bundle. The signing block must be in bundle.json before signing (`public_block`). Signature states: valid,
invalid, removed (tampered), unsigned; trust comes only from `--pubkey`, a key obtained some other way.
Key files, key forms, states: docs/bundle.md, "effai/bundle/sign.py".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from effai.bundle import index as index_mod
from effai.errors import EffaiError, UsageError
from effai.files import atomic_write

ALGORITHM = "ed25519"
SIGNATURE_BYTES = 64
STATES = ("valid", "invalid", "removed", "unsigned")


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is a dependency of effai
        raise EffaiError("signing needs the cryptography package: pip install cryptography") from None
    return ed25519


# ------------------------------------------------------------------------------------------------------ keys


def key_id(raw_public: bytes) -> str:
    """First 16 hex digits of sha256 of the raw 32-byte public key: how bundles and messages name a key."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _raw(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keygen(path: Path, force: bool = False) -> dict[str, Any]:
    """A new Ed25519 key pair: the private key at `path` (PEM PKCS#8, no passphrase, mode 0600) and the public key
    at `path`.pub (PEM SubjectPublicKeyInfo). Refuses to overwrite existing files unless `force`."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    path = Path(path)
    pub = public_path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; pass a file path for the private key, e.g. keys/effai-signing.key")
    for p in (path, pub):
        if p.exists() and not force:
            raise UsageError(f"{p} already exists; choose another KEY path, or pass --force to replace the key pair "
                             "(bundles signed with the old key will no longer match it)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_private(path, private_pem)
    atomic_write(pub, public_pem)
    return {"private": str(path), "public": str(pub), "key_id": key_id(_raw(key.public_key())),
            "algorithm": ALGORITHM}


def public_path(path: Path) -> Path:
    """KEY -> KEY.pub"""
    path = Path(path)
    return path.with_name(path.name + ".pub")


def _write_private(path: Path, data: bytes) -> None:
    """Atomically, readable by the owner only from the first byte on."""
    atomic_write(path, data, mode=0o600)


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist; make a key pair with: effai bundle keygen KEY")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory, not a key file")
    data = path.read_bytes()
    if len(data) > 64 * 1024:
        raise UsageError(f"{what} {path} is {len(data)} bytes, too big to be an Ed25519 key; pass the file written "
                         "by effai bundle keygen")
    return data


def load_private(path: Path) -> Any:
    """The Ed25519 private key in `path` (PEM PKCS#8 or OpenSSH); UsageError naming what is wrong otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    data = _read_key_file(path, "signing key")
    text = data.strip()
    key = None
    try:
        if text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, password=None)
        elif b"PRIVATE KEY-----" in text:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"signing key {path} is protected by a passphrase, which effai does not read; make an "
                         "unencrypted key with effai bundle keygen KEY (and keep it private)") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise UsageError(f"signing key {path} cannot be read ({e}); pass the private key written by effai zoo "
                         "keygen") from None
    if key is None:
        if _try_public(data) is not None:
            raise UsageError(f"{path} is a public key: signing needs the private key (the file without .pub, "
                             "written by effai bundle keygen)")
        raise UsageError(f"{path} is not an Ed25519 private key; make one with: effai bundle keygen KEY")
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"signing key {path} is a {type(key).__name__.replace('PrivateKey', '')} key; bundles are "
                         "signed with Ed25519: make a key with effai bundle keygen KEY")
    return key


def _try_public(data: bytes) -> Any:
    """An Ed25519 public key from public-key formats (PEM SPKI, OpenSSH line, raw base64); None if none fits.
    Raises UsageError for a recognised format holding another kind of key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    text = data.strip()
    key = None
    try:
        if text.startswith(b"-----BEGIN PUBLIC KEY-----"):
            key = serialization.load_pem_public_key(data)
        elif text.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(text)
        else:
            raw = base64.b64decode(text, validate=True)
            if len(raw) == 32:
                key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error, TypeError, UnsupportedAlgorithm):
        return None
    if key is not None and not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"this is a {type(key).__name__.replace('PublicKey', '').lstrip('_')} public key; bundles "
                         "are signed with Ed25519: pass the .pub written by effai bundle keygen")
    return key


def load_public(path: Path) -> Any:
    """The Ed25519 public key in `path`: PEM SubjectPublicKeyInfo (KEY.pub), base64 of the raw 32 bytes, an OpenSSH
    public key line, or a private key (its public half). UsageError for anything else."""
    data = _read_key_file(path, "public key")
    try:
        key = _try_public(data)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    if key is not None:
        return key
    if b"PRIVATE KEY-----" in data:
        return load_private(path).public_key()
    raise UsageError(f"{path} is not an Ed25519 public key (expected the PEM .pub written by effai bundle keygen, or "
                     "the base64 public_key from a bundle.json signing block)")


def public_block(key_path: Path) -> dict[str, str]:
    """bundle.json's `signing` block for the key at `key_path` (private or public): algorithm, public_key (base64
    of the raw 32 bytes), key_id."""
    key = load_public(key_path)
    raw = _raw(key)
    return {"algorithm": ALGORITHM, "public_key": base64.b64encode(raw).decode("ascii"), "key_id": key_id(raw)}


# --------------------------------------------------------------------------------------------------- signing


def sign(root: Path, key_path: Path) -> dict[str, Any]:
    """Write bundle.sig: base64 of the Ed25519 signature over bundle.json's exact bytes. bundle.json must already
    carry this key's signing block (public_block), and the files must match the index: a tampered bundle is never
    signed. Returns {"signature": path, "key_id": ...}."""
    root = Path(root)
    key = load_private(key_path)
    index = index_mod.read(root)
    block = public_block(key_path)
    have = index.get("signing")
    if not isinstance(have, dict) or have.get("public_key") != block["public_key"]:
        named = f"names key {have.get('key_id')}" if isinstance(have, dict) else "has no signing block"
        raise UsageError(f"{root / index_mod.INDEX} {named}, not the key in {key_path} ({block['key_id']}); write "
                         "the signing block first (effai bundle sign BUNDLE --key KEY does both)")
    problems = index_mod.check(root, index)
    if problems:
        raise EffaiError(f"refusing to sign {root}: its files do not match bundle.json ({_first(problems)}); "
                         "re-pack the bundle")
    data = (root / index_mod.INDEX).read_bytes()
    signature = key.sign(data)
    atomic_write(root / index_mod.SIGNATURE, base64.b64encode(signature).decode("ascii") + "\n")
    return {"signature": str(root / index_mod.SIGNATURE), "key_id": block["key_id"]}


def sign_bundle(root: Path, key_path: Path, force: bool = False) -> dict[str, Any]:
    """Sign an existing bundle with `key_path` (`effai bundle sign`): check the files against the index, put the key's
    signing block into bundle.json (regenerating MODEL_CARD.md, which names the key), re-index, then sign.
    Replaces an earlier valid signature by another key (returned as "replaced"); an INVALID one (bundle.json edited
    after signing, e.g. files swapped and their hashes updated) or a REMOVED one (bundle.json names a key, bundle.sig
    is gone) is refused unless `force`, since signing would bless the change. Sign only bundles you packed: an
    unsigned bundle from elsewhere may have been edited, and nothing in it can show that."""
    root = Path(root)
    key = load_private(key_path)  # a public key or garbage is refused before anything is written
    del key
    index = index_mod.read(root)
    problems = index_mod.check(root, index)
    if problems:
        raise EffaiError(f"refusing to sign {root}: its files do not match bundle.json ({_first(problems)}); "
                         "re-pack the bundle")
    earlier = check_signature(root, index)
    if earlier.state == "invalid" and not force:
        raise EffaiError(f"refusing to sign {root}: its current signature is invalid ({_first(earlier.problems)}), "
                         "so bundle.json changed after it was signed; re-pack the bundle, or pass --force if you "
                         "made that change yourself")
    if earlier.state == "removed" and not force:
        raise EffaiError(f"refusing to sign {root}: {earlier.problems[0]}. Pass --force only if you packed this "
                         "bundle yourself and an earlier effai bundle sign or effai bench --record was interrupted")
    sig = root / index_mod.SIGNATURE
    if sig.exists():
        sig.unlink()
    index["signing"] = public_block(key_path)
    reindex(root, index)
    info = sign(root, key_path)
    if earlier.state == "valid" and earlier.key_id != info["key_id"]:
        info["replaced"] = earlier.key_id
    return info


def reindex(root: Path, index: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Write bundle.json, regenerate MODEL_CARD.md from it (effai.bundle.model_card_md), and write bundle.json again so the
    new card's hash is listed. Returns (index written, a note when the card module is not available)."""
    index = index_mod.write(root, index)
    try:
        from effai.bundle import model_card_md as card
    except ImportError:
        return index, "MODEL_CARD.md was not regenerated (effai.bundle.model_card_md is not available)"
    card.write(root)
    return index_mod.write(root, index), None


def _first(problems: list[str], n: int = 3) -> str:
    more = f"; and {len(problems) - n} more" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more


# ------------------------------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` found. ok: every file matches the index and the signature is valid (or the bundle is unsigned
    and no key was given); with a key given, also signed by that key (`trusted`)."""

    ok: bool
    problems: list[str]
    signature: str                 # valid | invalid | removed | unsigned
    key_id: str | None             # the key bundle.json names (None when it names none)
    trusted: bool                  # signature valid AND made by the --pubkey key
    notes: list[str] = field(default_factory=list)
    files: int = 0                 # files listed in the index

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SignatureCheck:
    state: str
    key_id: str | None
    trusted: bool
    problems: list[str]
    notes: list[str]


def check_signature(root: Path, index: dict[str, Any], pubkey: Path | None = None) -> SignatureCheck:
    """The signature half of `verify` (install uses it alone): bundle.sig against bundle.json's bytes and the key
    the signing block names; with `pubkey`, that key must be the one that signed."""
    root = Path(root)
    given = None
    if pubkey is not None:
        raw = _raw(load_public(pubkey))
        given = key_id(raw), base64.b64encode(raw).decode("ascii")
    block = index.get("signing")
    sig_path = root / index_mod.SIGNATURE
    problems: list[str] = []
    notes: list[str] = []
    if block is None:
        if sig_path.exists():
            problems.append(f"{index_mod.SIGNATURE} is present but bundle.json names no signing key: bundle.json was "
                            "changed after signing")
            return SignatureCheck("invalid", None, False, problems, notes)
        if given is not None:
            problems.append(f"the bundle is unsigned, so it cannot be checked against the key you gave ({given[0]}); "
                            "ask for a signed bundle (effai bundle pack --sign KEY)")
        else:
            notes.append(UNSIGNED_NOTE)
        return SignatureCheck("unsigned", None, False, problems, notes)
    public = _block_key(block)
    if isinstance(public, str):
        return SignatureCheck("invalid", _named_id(block), False, [public], notes)
    raw = _raw(public)
    kid = key_id(raw)
    if block.get("key_id") != kid:
        problems.append(f"bundle.json's signing block says key_id {block.get('key_id')} but its public key is {kid}: "
                        "bundle.json was edited")
        return SignatureCheck("invalid", kid, False, problems, notes)
    if not sig_path.exists():
        problems.append(removed_message(kid))
        return SignatureCheck("removed", kid, False, problems, notes)
    state = _check_bytes(public, (root / index_mod.INDEX).read_bytes(), sig_path.read_bytes())
    if state != "valid":
        problems.append(state)
        state = "invalid"
    if given is not None and given[1] != block.get("public_key"):
        problems.append(f"signed by key_id {kid}, not by the key you gave ({given[0]})")
        return SignatureCheck(state, kid, False, problems, notes)
    trusted = state == "valid" and given is not None
    if state == "valid" and given is None:
        notes.append(f"signature by key {kid} is self-consistent but not checked against a key you trust: pass "
                     "--pubkey")
    return SignatureCheck(state, kid, trusted, problems, notes)


UNSIGNED_NOTE = ("the bundle is unsigned: its hashes catch accidental damage only, since anyone can change a file and "
                 "its hash in bundle.json; use a bundle signed by its publisher and check it with --pubkey KEY.pub")


def removed_message(kid: str) -> str:
    """The one line for a bundle whose index names a signing key but whose bundle.sig is gone."""
    return (f"signature removed: bundle.json says the bundle was signed by key {kid} but {index_mod.SIGNATURE} is "
            "missing, which is what a tampered bundle looks like (files changed, hashes updated, signature deleted); "
            "do not use it: get the bundle again from whoever published it")


def _named_id(block: Any) -> str | None:
    return str(block.get("key_id")) if isinstance(block, dict) and block.get("key_id") else None


def _block_key(block: Any) -> Any:
    """The public key a signing block names, or a one-line problem string."""
    ed25519 = _crypto()
    if not isinstance(block, dict):
        return "bundle.json's signing block is not an object: bundle.json was edited or is damaged"
    if block.get("algorithm") != ALGORITHM:
        return (f"bundle.json's signing block uses algorithm {block.get('algorithm')!r}; this effai verifies "
                f"{ALGORITHM} only (upgrade effai: pip install -U effai)")
    try:
        raw = base64.b64decode(str(block.get("public_key", "")), validate=True)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error) as e:
        return f"bundle.json's signing block holds no valid Ed25519 public key ({e}): bundle.json was edited"


def _check_bytes(public: Any, data: bytes, sig_text: bytes) -> str:
    from cryptography.exceptions import InvalidSignature

    try:
        signature = base64.b64decode(sig_text.strip(), validate=True)
    except (ValueError, binascii.Error):
        return f"{index_mod.SIGNATURE} is not base64: it was damaged or replaced"
    if len(signature) != SIGNATURE_BYTES:
        return (f"{index_mod.SIGNATURE} holds {len(signature)} bytes, not a {SIGNATURE_BYTES}-byte Ed25519 "
                "signature: it was damaged or replaced")
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return (f"signature invalid: {index_mod.SIGNATURE} does not match bundle.json (bundle.json was changed "
                "after signing, or the signature was replaced)")
    return "valid"


def verify(root: Path, pubkey: Path | None = None) -> VerifyResult:
    """Check every file against bundle.json (index.check: which file changed, is missing, or is not listed) and the
    signature over bundle.json. UsageError for a directory that is not a bundle, a bundle from a newer effai, or an
    unreadable --pubkey."""
    root = Path(root)
    index = index_mod.read(root)
    problems = index_mod.check(root, index)
    sig = check_signature(root, index, pubkey)
    problems += sig.problems
    ok = not problems and sig.state in ("valid", "unsigned") and (pubkey is None or sig.trusted)
    return VerifyResult(ok=ok, problems=problems, signature=sig.state, key_id=sig.key_id, trusted=sig.trusted,
                        notes=sig.notes, files=len(index.get("files", [])))
