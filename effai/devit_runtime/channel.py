"""The rendezvous of a DeViT run: a small key-value store the coordinator hosts, reachable only with the run's token.

The coordinator listens on exactly the address it was given. A device proves it holds the token (and the
coordinator proves it back) by HMAC-SHA256 over both sides' fresh nonces; every later frame is encrypted and
authenticated (ChaCha20-Poly1305, per-direction counters). `LocalStore` (coordinator) and `RemoteStore` (device)
are torch.distributed stores, so gloo exchanges its addresses through the same channel. See docs/security.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import socket
import stat
import struct
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from effai.errors import EffaiError, UsageError

PROTOCOL = 3          # 1 = join/verdict; 2 = + ready/start/joining; 3 = authenticated channel, hashes, device --data
MAGIC = b"EFFAI-DEVIT"
TOKEN_ENV = "EFFAI_DEVIT_TOKEN"
MIN_TOKEN_CHARS = 16
MAX_FRAME = 1 << 20     # rendezvous messages are small (device info, gloo addresses)
HANDSHAKE_S = 10.0      # an unauthenticated peer gets this long to prove it holds the token
MAX_CONNECTIONS = 64
MAX_WAIT_S = 86400.0
_HELLO = struct.Struct("!11sH32s")           # magic, protocol, client nonce
_REPLY = struct.Struct("!11sHB32s")          # magic, protocol, status, server nonce
OK, WRONG_TOKEN, WRONG_PROTOCOL = 0, 1, 2


# --- the token -------------------------------------------------------------------------------------------------------
def new_token() -> str:
    return secrets.token_urlsafe(32)


def check_token(text: str, what: str) -> str:
    token = text.strip()
    if len(token) < MIN_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        raise UsageError(f"{what} holds no usable token (at least {MIN_TOKEN_CHARS} printable ASCII characters, no "
                         "spaces); let `effai devit run --token-file PATH` create one")
    return token


def read_token(path: Path) -> str:
    """The token in `path`; refused when other users may read the file (like ssh keys)."""
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"--token-file {path} is not a regular file")
        if os.name == "posix" and st.st_mode & 0o077:
            raise UsageError(f"--token-file {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                             f"run chmod 600 {path}")
        with open(path, "rb") as f:
            data = f.read(4096)
    except FileNotFoundError:
        raise UsageError(f"--token-file {path} does not exist; copy the file `effai devit run --token-file` "
                         "created on the coordinator") from None
    except OSError as e:
        raise UsageError(f"cannot read --token-file {path}: {e.strerror or e}") from None
    return check_token(data.decode("ascii", errors="replace"), f"--token-file {path}")


def resolve_token(path: Path | None, create: bool = False) -> tuple[str | None, bool]:
    """(token, created): from `path` (created with a new token, mode 0600, when `create` and missing), else from
    $EFFAI_DEVIT_TOKEN, else (None, False)."""
    if path is not None:
        if create and not Path(path).exists():
            from effai.files import atomic_write

            token = new_token()
            atomic_write(Path(path), token + "\n", mode=0o600)
            return token, True
        return read_token(Path(path)), False
    env = os.environ.get(TOKEN_ENV)
    if env is not None:
        return check_token(env, f"${TOKEN_ENV}"), False
    return None, False


def _mac(token: bytes, label: bytes, data: bytes) -> bytes:
    return hmac.new(token, label + b"\0" + data, hashlib.sha256).digest()


# --- framing ---------------------------------------------------------------------------------------------------------
class ChannelClosed(Exception):
    """The peer closed the connection, or sent something that is not an authentic frame."""


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ChannelClosed("the connection was closed")
        buf += chunk
    return bytes(buf)


class _Session:
    def __init__(self, sock: socket.socket, key: bytes, side: int):
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self.sock, self.aead, self.side = sock, ChaCha20Poly1305(key), side
        self.sent = self.received = 0

    def send(self, obj: dict[str, Any]) -> None:
        nonce = struct.pack("!B3xQ", self.side, self.sent)
        self.sent += 1
        ct = self.aead.encrypt(nonce, json.dumps(obj).encode(), None)
        self.sock.sendall(struct.pack("!I", len(ct)) + ct)

    def recv(self) -> dict[str, Any]:
        from cryptography.exceptions import InvalidTag

        from effai.files import loads_json

        (n,) = struct.unpack("!I", _read(self.sock, 4))
        if n > MAX_FRAME + 16:
            raise ChannelClosed(f"a frame of {n:,} bytes is over the {MAX_FRAME:,}-byte limit")
        ct = _read(self.sock, n)
        nonce = struct.pack("!B3xQ", 1 - self.side, self.received)
        self.received += 1
        try:
            data = self.aead.decrypt(nonce, ct, None)
            obj = loads_json(data, "a rendezvous message")
        except (InvalidTag, UsageError):
            raise ChannelClosed("a frame failed its authentication check") from None
        if not isinstance(obj, dict):
            raise ChannelClosed("a frame is not a JSON object")
        return obj


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str) or len(text) > 2 * MAX_FRAME:
        raise ValueError("not a value")
    return base64.b64decode(text, validate=True)


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _seconds(t: Any) -> float:
    return t.total_seconds() if isinstance(t, timedelta) else float(t)


# --- the coordinator's store and server ------------------------------------------------------------------------------
class LocalStore(dist.Store):
    """An in-process store (the coordinator's): what the devices' RemoteStores read and write."""

    def __init__(self, timeout_s: float = 300.0):
        super().__init__()
        self._data: dict[str, bytes] = {}
        self._cv = threading.Condition()
        self._timeout = timeout_s
        self._closed = False

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def set_timeout(self, timeout: Any) -> None:
        self._timeout = _seconds(timeout)

    def wait_for(self, keys: list[str], timeout_s: float | None = None) -> None:
        t = self._timeout if timeout_s is None else timeout_s
        with self._cv:
            ok = self._cv.wait_for(lambda: self._closed or all(k in self._data for k in keys), t)
            if self._closed:
                raise dist.DistNetworkError("the rendezvous is closed")
        if not ok:
            raise dist.DistStoreError(f"timed out after {t:g}s waiting for {', '.join(keys)}")

    def set(self, key: str, value: Any) -> None:
        with self._cv:
            self._data[key] = _as_bytes(value)
            self._cv.notify_all()

    def get(self, key: str, timeout_s: float | None = None) -> bytes:
        self.wait_for([key], timeout_s)
        with self._cv:
            return self._data[key]

    def add(self, key: str, value: int) -> int:
        with self._cv:
            n = int(self._data.get(key, b"0")) + int(value)
            self._data[key] = str(n).encode()
            self._cv.notify_all()
            return n

    def check(self, keys: list[str]) -> bool:
        with self._cv:
            return all(k in self._data for k in keys)

    def wait(self, keys: list[str], timeout: Any = None) -> None:
        self.wait_for(list(keys), None if timeout is None else _seconds(timeout))

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        expected, desired = _as_bytes(expected), _as_bytes(desired)
        with self._cv:
            current = self._data.get(key)
            if (current is None and expected == b"") or current == expected:
                self._data[key] = desired
                self._cv.notify_all()
                return desired
            return expected if current is None else current

    def delete_key(self, key: str) -> bool:
        with self._cv:
            return self._data.pop(key, None) is not None

    def num_keys(self) -> int:
        with self._cv:
            return len(self._data)

    def multi_get(self, keys: list[str], timeout_s: float | None = None) -> list[bytes]:
        self.wait_for(list(keys), timeout_s)
        with self._cv:
            return [self._data[k] for k in keys]

    def multi_set(self, keys: list[str], values: list[Any]) -> None:
        with self._cv:
            for k, v in zip(keys, values):
                self._data[k] = _as_bytes(v)
            self._cv.notify_all()

    def append(self, key: str, value: Any) -> None:
        with self._cv:
            self._data[key] = self._data.get(key, b"") + _as_bytes(value)
            self._cv.notify_all()

    def has_extended_api(self) -> bool:
        return True


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on exactly `host` (IPv4 or IPv6; an IPv6 socket does not take IPv4 too)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(MAX_CONNECTIONS)
    except BaseException:
        sock.close()
        raise
    return sock


class Rendezvous:
    """The coordinator's side: `store` (a LocalStore) served to every peer that proves it holds `token`. Peers that
    fail are listed in `refused` (address and why) for the coordinator's messages. Always `close()` it."""

    def __init__(self, host: str, port: int, token: str, timeout_s: float = 300.0):
        self._sock = bind(host, port)
        self.port = self._sock.getsockname()[1]
        self.bound = self._sock.getsockname()[0]
        self.store = LocalStore(timeout_s)
        self.refused: list[str] = []
        self._token = token.encode()
        self._closed = False
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._sock.settimeout(0.2)
        threading.Thread(target=self._accept, name="effai-devit-rendezvous", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        self.store.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._sock.close()
        except OSError:
            pass

    def _refuse(self, peer: Any, why: str) -> None:
        with self._lock:
            if len(self.refused) < 20:
                self.refused.append(f"{peer[0] if isinstance(peer, tuple) else peer} ({why})")

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS or self._closed
                if not full:
                    self._conns.add(conn)
            if full:
                conn.close()
                self._refuse(peer, f"over {MAX_CONNECTIONS} connections")
                continue
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        try:
            conn.settimeout(HANDSHAKE_S)
            session = self._handshake(conn, peer)
            if session is None:
                return
            conn.settimeout(None)
            while not self._closed:
                request = session.recv()
                session.send(self._serve(request))
        except (OSError, ChannelClosed, dist.DistNetworkError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket, peer: Any) -> _Session | None:
        try:
            hello = _read(conn, _HELLO.size)
        except (OSError, ChannelClosed):   # a timeout, a reset, or it hung up
            self._refuse(peer, "it did not speak the effai devit protocol")
            return None
        magic, theirs, nonce_c = _HELLO.unpack(hello)
        if magic != MAGIC:
            self._refuse(peer, "it did not speak the effai devit protocol; an older effai uses another "
                         "rendezvous: install the same effai on every device")
            return None
        nonce_s = secrets.token_bytes(32)
        if theirs != PROTOCOL:
            self._refuse(peer, f"effai devit protocol {theirs}, this coordinator {PROTOCOL}")
            conn.sendall(_REPLY.pack(MAGIC, PROTOCOL, WRONG_PROTOCOL, bytes(32)))
            return None
        reply = _REPLY.pack(MAGIC, PROTOCOL, OK, nonce_s)
        conn.sendall(reply)
        transcript = hello + reply
        proof = _read(conn, 32)
        if not hmac.compare_digest(proof, _mac(self._token, b"client", transcript)):
            self._refuse(peer, "wrong token")
            conn.sendall(bytes([WRONG_TOKEN]) + bytes(32))
            return None
        conn.sendall(bytes([OK]) + _mac(self._token, b"server", transcript))
        return _Session(conn, _mac(self._token, b"session", transcript), side=1)

    def _serve(self, req: dict[str, Any]) -> dict[str, Any]:
        store = self.store
        try:
            op, keys = req.get("op"), req.get("keys")
            if not isinstance(keys, list) or not all(isinstance(k, str) and len(k) <= 1024 for k in keys) \
                    or len(keys) > 4096:
                raise ValueError("keys")
            t = req.get("timeout")
            t = None if t is None else min(max(float(t), 0.0), MAX_WAIT_S)
            if t is not None and not math.isfinite(t):
                raise ValueError("timeout")
            if op == "set":
                store.set(keys[0], _unb64(req["value"]))
                return {"ok": True}
            if op == "get":
                return {"ok": True, "value": _b64(store.get(keys[0], t))}
            if op == "multi_get":
                return {"ok": True, "values": [_b64(v) for v in store.multi_get(keys, t)]}
            if op == "multi_set":
                store.multi_set(keys, [_unb64(v) for v in req["values"]])
                return {"ok": True}
            if op == "add":
                n = req["n"]
                if type(n) is not int:
                    raise ValueError("n")
                return {"ok": True, "n": store.add(keys[0], n)}
            if op == "check":
                return {"ok": True, "bool": store.check(keys)}
            if op == "wait":
                store.wait_for(keys, t)
                return {"ok": True}
            if op == "compare_set":
                return {"ok": True, "value": _b64(store.compare_set(keys[0], _unb64(req["expected"]),
                                                                     _unb64(req["desired"])))}
            if op == "delete_key":
                return {"ok": True, "bool": store.delete_key(keys[0])}
            if op == "num_keys":
                return {"ok": True, "n": store.num_keys()}
            if op == "append":
                store.append(keys[0], _unb64(req["value"]))
                return {"ok": True}
            raise ValueError("op")
        except dist.DistStoreError as e:
            return {"ok": False, "timeout": True, "error": str(e)}
        except (KeyError, IndexError, TypeError, ValueError) as e:
            return {"ok": False, "error": f"malformed request ({e})"}


# --- the device's store ----------------------------------------------------------------------------------------------
def connect(host: str, port: int, token: str, timeout_s: float) -> "RemoteStore":
    """Reach the coordinator (retrying until `timeout_s`, as it may start later) and authenticate both ways.
    OSError: not reachable; UsageError/EffaiError: reached, but the handshake said why not."""
    address = f"{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
    try:
        sock.settimeout(HANDSHAKE_S)
        session = _client_handshake(sock, token.encode(), address)
    except BaseException:
        sock.close()
        raise
    return RemoteStore(sock, session, timeout_s)


def _client_handshake(sock: socket.socket, token: bytes, address: str) -> _Session:
    other = (f"the service at {address} did not answer as an effai devit coordinator (protocol {PROTOCOL}); it runs "
             "an older effai (install the same effai on every device) or is not the coordinator: check the address")
    hello = _HELLO.pack(MAGIC, PROTOCOL, secrets.token_bytes(32))
    try:
        sock.sendall(hello)
        reply = _read(sock, _REPLY.size)
    except (OSError, ChannelClosed) as e:
        raise EffaiError(f"{other} ({e})") from None
    magic, theirs, status, _ = _REPLY.unpack(reply)
    if magic != MAGIC:
        raise EffaiError(other)
    if status == WRONG_PROTOCOL or theirs != PROTOCOL:
        raise UsageError(f"the coordinator at {address} runs effai devit protocol {theirs}, this device {PROTOCOL}: "
                         "install the same effai on every device")
    transcript = hello + reply
    try:
        sock.sendall(_mac(token, b"client", transcript))
        answer = _read(sock, 33)
    except (OSError, ChannelClosed) as e:
        raise EffaiError(f"the coordinator at {address} closed the connection during the handshake ({e})") from None
    if answer[0] == WRONG_TOKEN:
        raise UsageError(f"the coordinator at {address} refused this device's token: give every device the token "
                         f"file of this run (--token-file) or ${TOKEN_ENV}")
    if answer[0] != OK or not hmac.compare_digest(answer[1:], _mac(token, b"server", transcript)):
        raise EffaiError(f"the service at {address} does not hold this run's token: it is not this run's "
                         "coordinator; check the address")
    return _Session(sock, _mac(token, b"session", transcript), side=0)


class RemoteStore(dist.Store):
    """A device's view of the coordinator's LocalStore over the authenticated channel. A closed connection raises
    DistNetworkError, a wait that runs out DistStoreError (as TCPStore does)."""

    def __init__(self, sock: socket.socket, session: _Session, timeout_s: float):
        super().__init__()
        self._sock, self._session = sock, session
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._broken: str | None = None
        self.local_address = sock.getsockname()[0]   # this host's address towards the coordinator (for gloo)

    def close(self) -> None:
        self._broken = self._broken or "closed by this device"
        try:
            self._sock.close()
        except OSError:
            pass

    def set_timeout(self, timeout: Any) -> None:
        self._timeout = _seconds(timeout)

    def _call(self, op: str, keys: list[str], wait: float | bool = False, **fields: Any) -> dict[str, Any]:
        """One request and its answer; `wait`: True (this store's timeout) or the seconds a blocking op may take."""
        request = {"op": op, "keys": list(keys), **fields}
        wait_s = self._timeout if wait is True else float(wait) if wait is not False else 0.0
        if wait is not False:
            request["timeout"] = wait_s
        with self._lock:
            if self._broken:
                raise dist.DistNetworkError(f"the connection to the coordinator is gone ({self._broken})")
            try:
                self._sock.settimeout(max(wait_s, self._timeout) + 10.0)
                self._session.send(request)
                answer = self._session.recv()
            except socket.timeout:
                self._broken = "it did not answer"
                raise dist.DistStoreError(f"the coordinator did not answer within {self._timeout:g}s") from None
            except (OSError, ChannelClosed) as e:
                self._broken = str(e) or type(e).__name__
                raise dist.DistNetworkError(f"the coordinator closed the connection ({self._broken})") from None
        if not answer.get("ok"):
            error = str(answer.get("error"))[:300]
            raise (dist.DistStoreError if answer.get("timeout") else dist.DistError)(error)
        return answer

    def set(self, key: str, value: Any) -> None:
        self._call("set", [key], value=_b64(_as_bytes(value)))

    def get(self, key: str) -> bytes:
        return _unb64(self._call("get", [key], wait=True)["value"])

    def add(self, key: str, value: int) -> int:
        return int(self._call("add", [key], n=int(value))["n"])

    def check(self, keys: list[str]) -> bool:
        return bool(self._call("check", list(keys))["bool"])

    def wait(self, keys: list[str], timeout: Any = None) -> None:
        if timeout is None:
            self._call("wait", list(keys), wait=True)
        else:
            self._call("wait", list(keys), wait=_seconds(timeout))

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        answer = self._call("compare_set", [key], expected=_b64(_as_bytes(expected)), desired=_b64(_as_bytes(desired)))
        return _unb64(answer["value"])

    def delete_key(self, key: str) -> bool:
        return bool(self._call("delete_key", [key])["bool"])

    def num_keys(self) -> int:
        return int(self._call("num_keys", [])["n"])

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [_unb64(v) for v in self._call("multi_get", list(keys), wait=True)["values"]]

    def multi_set(self, keys: list[str], values: list[Any]) -> None:
        self._call("multi_set", list(keys), values=[_b64(_as_bytes(v)) for v in values])

    def append(self, key: str, value: Any) -> None:
        self._call("append", [key], value=_b64(_as_bytes(value)))

    def has_extended_api(self) -> bool:
        return True
