"""DeViT collaborative inference on torch.distributed: gloo over TCP, one process per device, works across hosts.

Rank 0 (coordinator) holds the fusion head and fuses the N CLS features (B x d_sub float32 each: the only data on the
network) that ranks i + 1 (device i, part i) send per batch. Rendezvous: effai/devit_runtime/channel.py. Every wait
is bounded by `timeout_s`: a failing device ends the run with an EffaiError naming its rank, part and host, never a
hang. Protocol and measurements: docs/distill.md, "effai/devit_runtime/runtime.py".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import statistics
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from effai.devit_runtime import channel
from effai.devit_runtime.channel import PROTOCOL
from effai.devit_runtime.inputs import Stream, load_stream
from effai.devit_runtime.parts import Decomposition, Part, check_part
from effai.errors import EffaiError, UsageError
from effai.files import loads_json

KEY = "effai-devit"
STOP = -1
MAX_IMAGES = 1_000_000
MAX_RANDOM_BYTES = 4 << 30   # a device generates at most this much of a random stream the coordinator asks for
START_MARGIN_S = 5.0  # a ready device waits for start the coordinator's timeout_s plus this (the coordinator's clock)
ACK_S = 3.0           # how long an aborting coordinator lets the devices read why before it exits


@dataclass(frozen=True)
class RunSpec:
    data: str = "random"          # random[:SEED] | digits | DIR | X.npz (held-out split), read by every process
    images: int = 64              # images to stream (whole batches)
    batch_size: int = 1
    warmup: int = 2               # untimed batches first (allocator, caches, connections)
    timeout_s: float = 30.0       # bound on every wait: joining, each send and receive
    send_images: bool = False     # the coordinator sends each batch to the devices (else devices read it locally)


_SPEC_TYPES = {"data": str, "images": int, "batch_size": int, "warmup": int, "timeout_s": float, "send_images": bool}


def spec_from_peer(obj: Any, address: str) -> RunSpec:
    """The coordinator's RunSpec as a device accepts it: exactly RunSpec's fields, each of its type and in range."""
    what = f"the coordinator at {address} sent a run spec that"
    if not isinstance(obj, dict):
        raise UsageError(f"{what} is not an object; install the same effai on every device")
    names = {f.name for f in fields(RunSpec)}
    unknown, missing = sorted(set(obj) - names), sorted(names - set(obj))
    if unknown or missing:
        raise UsageError(f"{what} has {'unknown' if unknown else 'no'} field(s) {_clean(', '.join(unknown or missing))}"
                         "; install the same effai on every device")
    for name, kind in _SPEC_TYPES.items():
        if not _typed(obj[name], kind):
            raise UsageError(f"{what} has {name} of the wrong type ({type(obj[name]).__name__}, not {kind.__name__})")
    spec = RunSpec(**obj)
    if not (1 <= spec.images <= MAX_IMAGES and 1 <= spec.batch_size <= spec.images and 0 <= spec.warmup <= 100_000
            and 0 < spec.timeout_s <= channel.MAX_WAIT_S and len(spec.data) <= 1000):
        raise UsageError(f"{what} is out of range (images 1..{MAX_IMAGES:,}, batch_size 1..images, warmup "
                         f"0..100000, timeout_s 0..{channel.MAX_WAIT_S:g}, data up to 1000 characters)")
    return spec


def _typed(value: Any, kind: Any) -> bool:
    if kind is bool or kind is int:
        return type(value) is kind
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str) and len(value) <= 4096
    if kind == "str?":
        return value is None or _typed(value, str)
    if kind in ("ints", "floats"):
        return isinstance(value, list) and len(value) <= 100_000 and all(
            _typed(v, int if kind == "ints" else float) for v in value)
    return isinstance(value, kind)


_DEVICE = {"protocol": int, "part": int, "parts": int, "split_hash": str, "d_sub": int, "classes": "ints",
           "sha256": str, "path": str, "host": str, "pid": int, "params": int, "input_size": "ints", "mean": "floats",
           "std": "floats"}
_VERDICT = {"ok": bool, "protocol": int, "spec": dict, "val_seed": int, "val_fraction": float, "error": "str?",
            "usage": bool}
_READY = {"ok": bool, "error": "str?", "usage": bool, "stream": "str?", "data": "str?"}
_START = {"ok": bool, "error": "str?"}


def _message(raw: bytes, schema: dict[str, Any], what: str, required: tuple[str, ...] = ("ok",)) -> dict[str, Any]:
    """A rendezvous message parsed and checked against `schema` (name -> type): unknown fields, missing required
    ones and wrong types are a UsageError naming `what`."""
    obj = loads_json(raw, what)
    if not isinstance(obj, dict):
        raise UsageError(f"{what} is not a JSON object; install the same effai on every device")
    unknown = sorted(set(obj) - set(schema))
    missing = [k for k in required if k not in obj]
    if unknown or missing:
        raise UsageError(f"{what} has {'unknown' if unknown else 'no'} field(s) {_clean(', '.join(unknown or missing))}"
                         "; install the same effai on every device")
    for name, value in obj.items():
        if not _typed(value, schema[name]):
            raise UsageError(f"{what} has {name} of the wrong type; install the same effai on every device")
    return obj


def _clean(text: Any, limit: int = 600) -> str:
    """A peer's text as this process prints it: printable characters only (no terminal escapes), bounded."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[:limit] + "…"


def stream_digest(stream: Stream) -> str:
    """sha256 of the normalized images: the coordinator checks that every device reads the images it fuses."""
    h = hashlib.sha256(repr(tuple(stream.x.shape)).encode())
    h.update(stream.x.contiguous().numpy().tobytes())
    return h.hexdigest()


def _is_random(data: str) -> bool:
    return data == "random" or data.startswith("random:")


@dataclass
class RunResult:
    logits: torch.Tensor          # (images, K) of the timed batches, in stream order
    labels: torch.Tensor | None
    report: dict[str, Any]


class DeviceLost(EffaiError):
    """A device (or the coordinator) stopped answering mid-run."""


class DeviceExited(EffaiError):
    """A device process the coordinator started itself (run_local) has exited; `rank` is its rank."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--coordinator '{text}' must be HOST:PORT, like 192.168.1.10:29500 or 127.0.0.1:0")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(e).__name__   # gloo's "[file.cc:545] "
    return line.split(". ")[0][:200]


def _describe(rank: int, info: dict[str, Any] | None) -> str:
    where = f", {_clean(info.get('host'), 100)} pid {_clean(info.get('pid'), 20)}" if info else ""
    return f"device rank {rank} (part {rank - 1}{where})"


def _wait(work: Any, who: str, what: str, timeout_s: float) -> None:
    try:
        work.wait(_td(timeout_s))
    except Exception as e:
        raise DeviceLost(f"{who} {what} failed: {_first_line(e)}; it died, hung or the network dropped "
                         f"(timeout {timeout_s:g}s); the run is aborted") from e


def _gloo_device(local: str | None) -> Any:
    """gloo's socket on `local` (the address the coordinator listens on, or a device's address towards it); gloo's
    default device (GLOO_SOCKET_IFNAME, else this host's name) when that variable is set or `local` is a wildcard."""
    if os.environ.get("GLOO_SOCKET_IFNAME") or not local or local in ("0.0.0.0", "::"):
        return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=local)


def _init_group(store: Any, rank: int, world: int, timeout_s: float, address: str, local: str | None,
                watch: Callable[[], None] | None = None) -> Any:
    """Join the gloo process group (returned). When it does not form, say why: the coordinator ended the run (a
    device's view), a device that reported ready never joined (named), else the network."""
    try:
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [_gloo_device(local)]
        opts._timeout = _td(timeout_s)
        return dist.ProcessGroupGloo(dist.PrefixStore(f"{KEY}/pg", store), rank, world, opts)
    except Exception as e:
        if rank > 0 and not _reachable(store):   # not the network: the coordinator ended the run (it says why)
            raise _coordinator_failed(e, address, "") from e
        named = _never_joined(store, world, timeout_s, watch)
        if named is not None:
            raise named from e
        raise EffaiError(f"gloo could not connect the {world} processes of the run at {address} within "
                         f"{timeout_s:g}s ({_first_line(e)}); across hosts set GLOO_SOCKET_IFNAME to the network "
                         "interface the devices share, on every host") from e


def _reachable(store: Any) -> bool:
    try:
        store.check([f"{KEY}/start"])
        return True
    except Exception:
        return False


def _coordinator_failed(e: Exception, address: str, timed_out: str) -> EffaiError:
    """A device's store call failed: the coordinator closed the rendezvous (it ended the run and its own error says
    why), or it did not answer within the wait (`timed_out` says which)."""
    if isinstance(e, dist.DistNetworkError) or not timed_out:
        return EffaiError(f"the coordinator at {address} ended the run ({_first_line(e)}); its own output says why")
    return EffaiError(f"the coordinator at {address} {timed_out} ({_first_line(e)})")


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {"median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "mean": statistics.fmean(s),
            "min": s[0], "max": s[-1]}


# --- coordinator ------------------------------------------------------------------------------------------------------
def coordinate(decomp: Decomposition, address: str, spec: RunSpec, *, token: str,
               on_listening: Callable[[str, int], None] | None = None,
               watch: Callable[[], None] | None = None) -> RunResult:
    """Host the rendezvous at exactly `address` (port 0: any free port, passed to `on_listening`) for the peers that
    hold `token`, wait for the N devices, check them, stream `spec.images` images through them and fuse their
    features. `watch` is called while waiting for devices to join and to get ready (run_local raises from it when a
    device process it started has exited)."""
    host, port = parse_address(address)
    channel.check_token(token, "the run's token")
    try:
        rv = channel.Rendezvous(host, port, token, timeout_s=spec.timeout_s)
    except Exception as e:
        raise UsageError(f"the coordinator cannot listen on {host}:{port} ({_first_line(e)}); choose a free port or "
                         "an address of this host") from e
    try:
        if on_listening is not None:
            on_listening(host, rv.port)
        return _coordinate(decomp, rv, format_address(host, rv.port), spec, watch)
    finally:
        rv.close()


def _coordinate(decomp: Decomposition, rv: channel.Rendezvous, address: str, spec: RunSpec,
                watch: Callable[[], None] | None) -> RunResult:
    store, fusion = rv.store, decomp.fusion
    n = fusion.parts
    raw = _await_devices(rv, n, spec.timeout_s, address, watch)
    peers: dict[int, dict[str, Any]] = {}
    refusal: EffaiError | None = None
    digest: str | None = None
    try:
        for r, text in raw.items():
            peers[r] = _device_info(text, r)
        for r, info in peers.items():
            check_part(fusion, info, f"{_describe(r, info)} serving {_clean(info['path'], 300)}", index=r - 1)
            expected = decomp.part_sha256(r - 1)
            if info["sha256"] != expected:
                raise UsageError(f"{_describe(r, info)} serves {_clean(info['path'], 300)}, whose weights are not "
                                 f"part {r - 1} of this run (sha256 {_clean(info['sha256'])[:12]}…, the run's "
                                 f"{expected[:12]}…); copy the run's part_{r - 1}/model.safetensors to that device")
        part_card = decomp.parts[0].card
        size, mean, std = tuple(part_card.input_size), list(part_card.mean), list(part_card.std)
        dataset = decomp.manifest.get("dataset", {})
        if "val_seed" not in dataset and not _is_random(spec.data):
            raise UsageError("the run's devit.json (its held-out split) is missing: copy it next to fusion/, or "
                             "stream --data random")
        val_seed, val_fraction = int(dataset.get("val_seed", 0)), float(dataset.get("val_fraction", 0.2))
        stream = load_stream(spec.data, size, mean, std, spec.images, val_seed,  # type: ignore[arg-type]
                             val_fraction)
        if stream.batches(spec.batch_size) < 1:
            raise UsageError(f"--images {spec.images} is fewer than one batch of {spec.batch_size}")
        digest = None if spec.send_images else stream_digest(stream)
    except EffaiError as e:
        refusal = e
    _publish(store, n, {"ok": refusal is None, "protocol": PROTOCOL, "spec": asdict(spec),
                        "val_seed": val_seed if refusal is None else 0,
                        "val_fraction": val_fraction if refusal is None else 0.2,
                        "error": f"refused by the coordinator at {address}: {refusal}" if refusal else None,
                        "usage": isinstance(refusal, UsageError)})
    if refusal is not None:
        _await_acks(store, n, spec.timeout_s)
        raise refusal
    _await_ready(store, peers, spec, digest, address, watch)
    pg = _init_group(store, 0, n + 1, spec.timeout_s, address, rv.bound, watch)
    return _coordinator_loop(decomp, pg, peers, stream, spec, address)


def _device_info(raw: bytes, rank: int) -> dict[str, Any]:
    """What device `rank` published on joining, checked: its protocol first (an older effai is named as such),
    then every field's type."""
    what = f"{_describe(rank, None)}'s description"
    obj = loads_json(raw, what)
    theirs = obj.get("protocol", 1) if isinstance(obj, dict) else None
    if theirs != PROTOCOL:
        raise UsageError(f"{_describe(rank, obj if isinstance(obj, dict) else None)} runs effai devit protocol "
                         f"{_clean(theirs, 20)}, the coordinator {PROTOCOL}: install the same effai on every device")
    return _message(raw, _DEVICE, what, required=tuple(_DEVICE))


def _await_devices(rv: channel.Rendezvous, n: int, timeout_s: float, address: str,
                   watch: Callable[[], None] | None) -> dict[int, bytes]:
    store = rv.store
    deadline = time.monotonic() + timeout_s
    while True:
        if watch is not None:
            try:
                watch()
            except EffaiError as e:
                _publish(store, n, {"ok": False, "protocol": PROTOCOL, "error": str(e),
                                    "usage": isinstance(e, UsageError)})
                joined = {r for r in range(1, n + 1) if store.check([f"{KEY}/device/{r}"])}
                _await_acks(store, len(joined - _dead(e)), timeout_s)
                raise
        joined = [r for r in range(1, n + 1) if store.check([f"{KEY}/device/{r}"])]
        if len(joined) == n:
            return {r: store.get(f"{KEY}/device/{r}") for r in range(1, n + 1)}
        if time.monotonic() > deadline:
            missing = [r for r in range(1, n + 1) if r not in joined]
            refused = f"; refused: {', '.join(rv.refused[:5])}" if rv.refused else ""
            msg = (f"{', '.join(f'device rank {r} (part {r - 1})' for r in missing)} did not join the coordinator at "
                   f"{address} within {timeout_s:g}s; start `effai devit serve RUN --part I --coordinator {address} "
                   f"--token-file FILE` on each device with this run's token, or check the address and firewall"
                   f"{refused}")
            _publish(store, n, {"ok": False, "protocol": PROTOCOL, "error": msg, "usage": False})
            _await_acks(store, len(joined), timeout_s)
            raise EffaiError(msg)
        time.sleep(0.02)


def _await_ready(store: Any, peers: dict[int, dict[str, Any]], spec: RunSpec, digest: str | None, address: str,
                 watch: Callable[[], None] | None) -> None:
    """After the go: wait until every device reports ready (its inputs loaded: the coordinator's images, by their
    `digest`), then say start. A device that reports a failure or other images, or whose process `watch` finds dead,
    aborts the run at once naming it; every device that did not fail (ready, or still loading) gets up to ACK_S to
    read why."""
    timeout_s = spec.timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        states = _ready_states(store, peers)
        failure = _reported_failure(states, peers, spec, digest)
        if failure is None and watch is not None:
            try:
                watch()
            except EffaiError as e:   # a device that reported its own error and exited: its report (kind, exit code)
                time.sleep(0.05)      # wins over the generic exit notice; its last write may still be in flight
                failure = _reported_failure(_ready_states(store, peers), peers, spec, digest) or e
        if failure is None and len(states) == len(peers):
            store.set(f"{KEY}/start", json.dumps({"ok": True}))
            return
        if failure is None and time.monotonic() > deadline:
            late = ", ".join(_describe(r, peers[r]) for r in sorted(peers) if r not in states)
            failure = EffaiError(f"{late} did not get ready (load its inputs) within {timeout_s:g}s of the "
                                 "coordinator's go; check that device, or raise --timeout")
        if failure is not None:
            store.set(f"{KEY}/start", json.dumps({"ok": False, "error": f"the run was aborted by the coordinator at "
                                                  f"{address}: {failure}"}))
            failed = {r for r, state in _ready_states(store, peers).items() if not state["ok"]} | _dead(failure)
            _await_acks(store, len(set(peers) - failed), timeout_s, key="start_ack")
            raise failure
        time.sleep(0.02)


def _ready_states(store: Any, peers: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """rank -> what the device reported after the go ({"ok": true, "stream": ...} or its error), for those that have
    reported; a malformed report counts as the device's failure."""
    states = {}
    for r in sorted(peers):
        if store.check([f"{KEY}/ready/{r}"]):
            try:
                states[r] = _message(store.get(f"{KEY}/ready/{r}"), _READY, f"{_describe(r, peers[r])}'s ready report")
            except UsageError as e:
                states[r] = {"ok": False, "error": str(e), "usage": True}
    return states


def _reported_failure(states: dict[int, dict[str, Any]], peers: dict[int, dict[str, Any]], spec: RunSpec,
                      digest: str | None) -> EffaiError | None:
    for r, state in states.items():
        if not state["ok"]:
            return (UsageError if state.get("usage") else EffaiError)(
                f"{_describe(r, peers[r])} failed before joining the run: {_clean(state.get('error'))}")
        if digest is not None and state.get("stream") != digest:
            return UsageError(f"{_describe(r, peers[r])} reads other images (its --data "
                              f"{_clean(state.get('data'), 200)}) than the coordinator (--data {_clean(spec.data, 200)}"
                              "); start every device with --data naming its copy of the coordinator's data, or run "
                              "the coordinator with --send-images")
    return None


def _dead(e: EffaiError) -> set[int]:
    """The rank whose process is known to be gone (it cannot ack anything)."""
    return {e.rank} if isinstance(e, DeviceExited) else set()


def _never_joined(store: Any, world: int, timeout_s: float, watch: Callable[[], None] | None) -> EffaiError | None:
    """Why the process group did not form, naming the device: a process run_local started that has exited (its exit
    code and log), else the devices that reported ready but never said they were joining; None: not known."""
    if watch is not None:
        try:
            watch()
        except EffaiError as e:
            return e
    try:
        missing = [r for r in range(1, world) if not store.check([f"{KEY}/joining/{r}"])]
        who = []
        for r in missing:
            try:
                info = _message(store.get(f"{KEY}/device/{r}"), _DEVICE, "a device's description", required=())
            except UsageError:
                info = None
            who.append(_describe(r, info))
    except Exception:   # the store is gone (the coordinator ended the run)
        return None
    if not who:
        return None
    return EffaiError(f"{', '.join(who)} reported ready, then never joined the process group within {timeout_s:g}s "
                      "(crashed?); check that device's output")


def _publish(store: Any, n: int, verdict: dict[str, Any]) -> None:
    text = json.dumps(verdict)
    for r in range(1, n + 1):
        store.set(f"{KEY}/verdict/{r}", text)


def _await_acks(store: Any, joined: int, timeout_s: float, key: str = "ack") -> None:
    """Before a refusing coordinator exits (taking the store with it), let `joined` devices read why (<= ACK_S)."""
    deadline = time.monotonic() + min(ACK_S, timeout_s)
    while joined and time.monotonic() < deadline:
        if store.add(f"{KEY}/{key}", 0) >= joined:
            return
        time.sleep(0.02)


def _coordinator_loop(decomp: Decomposition, pg: Any, peers: dict[int, dict[str, Any]], stream: Stream,
                      spec: RunSpec, address: str) -> RunResult:
    fusion = decomp.fusion.model
    n, d, bsz = fusion.parts, fusion.d_sub, spec.batch_size
    nb = stream.batches(bsz)
    steps = spec.warmup + nb
    who = {r: _describe(r, peers[r]) for r in peers}
    bufs = [torch.empty(bsz, d) for _ in range(n)]
    logits, e2e, waits, fuse_ms = [], [], [], []
    for step in range(steps):
        b = step - spec.warmup if step >= spec.warmup else step % nb
        t0 = time.perf_counter()
        ctrl = torch.tensor([b, bsz], dtype=torch.int64)
        pending = [(r, "receiving the request", pg.send([ctrl], r, 0)) for r in peers]
        if spec.send_images:
            x = stream.batch(b, bsz).contiguous()
            pending += [(r, "receiving the images", pg.send([x], r, 0)) for r in peers]
        pending += [(r, "sending its CLS feature", pg.recv([bufs[r - 1]], r, 0)) for r in peers]
        for r, what, work in pending:
            _wait(work, who[r], what, spec.timeout_s)
        t1 = time.perf_counter()
        with torch.no_grad():
            z = fusion.fuse(bufs)
        t2 = time.perf_counter()
        if step >= spec.warmup:
            logits.append(z.clone())
            e2e.append((t2 - t0) * 1e3)
            waits.append((t1 - t0) * 1e3)
            fuse_ms.append((t2 - t1) * 1e3)
    stop = torch.tensor([STOP, 0], dtype=torch.int64)
    for r, work in [(r, pg.send([stop], r, 0)) for r in peers]:
        _wait(work, who[r], "receiving the stop", spec.timeout_s)
    device_t = {r: torch.empty(steps, 3, dtype=torch.float64) for r in peers}   # compute ms, send ms, bytes per step
    for r, work in [(r, pg.recv([device_t[r]], r, 0)) for r in peers]:
        _wait(work, who[r], "sending its timings", spec.timeout_s)
    compute = {r: device_t[r][spec.warmup:, 0].tolist() for r in peers}
    network = [max(0.0, w - max(compute[r][i] for r in peers)) for i, w in enumerate(waits)]
    images = nb * bsz
    c, h, w = stream.x.shape[1:]
    image_bytes = c * h * w * 4 if spec.send_images else 0
    out = torch.cat(logits)
    labels = stream.y[:images] if stream.y is not None else None
    report: dict[str, Any] = {
        "backend": "gloo", "coordinator": address, "parts": n, "world_size": n + 1, "data": stream.source,
        "inputs": "sent by the coordinator" if spec.send_images else "read locally by every device",
        "images": images, "batch_size": bsz, "warmup_batches": spec.warmup, "split_hash": decomp.fusion.split_hash,
        "end_to_end_ms": _ms(e2e), "per_image_ms": statistics.median(e2e) / bsz,
        "throughput_images_per_s": images / (sum(e2e) / 1e3), "fusion_ms": _ms(fuse_ms),
        "network_ms": _ms(network),   # coordinator wait minus the slowest device's compute, per batch
        "feature_bytes_per_image": n * d * 4, "image_bytes_per_image": n * image_bytes,
        "devices": [{"rank": r, "part": r - 1, "host": peers[r].get("host"), "pid": peers[r].get("pid"),
                     "params": peers[r].get("params"), "compute_ms": _ms(compute[r]),
                     "send_ms": _ms(device_t[r][spec.warmup:, 1].tolist()),
                     "bytes_sent": int(device_t[r][:, 2].sum()),             # measured: numel x element size
                     "bytes_per_image": float(device_t[r][spec.warmup:, 2].sum()) / images} for r in sorted(peers)],
    }
    if labels is not None:
        report["accuracy"] = float((out.argmax(1) == labels).float().mean())
    return RunResult(out, labels, report)


# --- device -----------------------------------------------------------------------------------------------------------
def device_info(part: Part) -> dict[str, Any]:
    """What a device publishes on joining (only to holders of the run's token); the coordinator checks it, its
    weights' sha256 included, before its go."""
    card, info = part.card, part.info
    return {"protocol": PROTOCOL, "part": int(info["part"]), "parts": int(info["parts"]),
            "split_hash": str(info["split_hash"]), "d_sub": int(info["d_sub"]),
            "classes": [int(c) for c in info.get("classes", [])], "sha256": part.sha256, "path": str(part.path),
            "host": socket.gethostname(), "pid": os.getpid(), "params": sum(p.numel() for p in part.model.parameters()),
            "input_size": [int(v) for v in card.input_size], "mean": [float(v) for v in card.mean],
            "std": [float(v) for v in card.std]}


def serve(part: Part, address: str, *, token: str, timeout_s: float = 60.0, data: str | None = None,
          fail_after: int | None = None) -> dict[str, Any]:
    """Join the coordinator at `address` (proving `token`) as device `part.index` (rank index + 1) and answer its
    requests until it says stop. Images come from `data` (this device's own --data; the coordinator's random[:SEED]
    when None) or from the coordinator (its send_images). `timeout_s` bounds reaching the coordinator and its go;
    from the go on the device follows the coordinator's timeout. `fail_after` (tests only) kills this process without
    a goodbye after that many batches (0: right after the coordinator's go, before joining the process group)."""
    host, port = parse_address(address)
    channel.check_token(token, "the run's token")
    try:
        store = channel.connect(host, port, token, timeout_s)
    except OSError as e:
        raise EffaiError(f"cannot reach the coordinator at {address} within {timeout_s:g}s ({_first_line(e)}); start "
                         "`effai devit run` there first, or check the address and firewall") from e
    try:
        return _serve(part, store, address, timeout_s, data, fail_after)
    finally:
        store.close()


def _serve(part: Part, store: channel.RemoteStore, address: str, timeout_s: float, data: str | None,
           fail_after: int | None) -> dict[str, Any]:
    rank, n = part.index + 1, int(part.info["parts"])
    card = part.card
    try:
        claimed = store.add(f"{KEY}/claim/{rank}", 1)
        if claimed == 1:
            store.set(f"{KEY}/device/{rank}", json.dumps(device_info(part)))
    except Exception as e:
        raise _coordinator_failed(e, address, "") from e
    if claimed > 1:
        raise UsageError(f"part {part.index} is already served by another device at {address}; give each device "
                         "its own --part")
    try:
        raw = store.get(f"{KEY}/verdict/{rank}")
        store.add(f"{KEY}/ack", 1)
    except Exception as e:
        if not isinstance(e, dist.DistNetworkError):   # the coordinator will find out at once, after its go
            _report(store, rank, f"gave up waiting for the coordinator's go after {timeout_s:g}s (its --timeout); "
                                 "give every device a --timeout at least the coordinator's")
        raise _coordinator_failed(e, address, f"did not answer within {timeout_s:g}s") from e
    verdict = _message(raw, _VERDICT, f"the verdict of the coordinator at {address}")
    if not verdict["ok"]:
        raise (UsageError if verdict.get("usage") else EffaiError)(_clean(verdict.get("error")))
    theirs = verdict.get("protocol", 1)
    if theirs != PROTOCOL:
        raise UsageError(f"the coordinator at {address} runs effai devit protocol {theirs}, this device {PROTOCOL}: "
                         "install the same effai on every device")
    for name in ("spec", "val_seed", "val_fraction"):
        if name not in verdict:
            raise UsageError(f"the verdict of the coordinator at {address} has no {name}; install the same effai on "
                             "every device")
    spec = spec_from_peer(verdict["spec"], address)
    if not 0.0 < verdict["val_fraction"] < 1.0:
        raise UsageError(f"the verdict of the coordinator at {address} has val_fraction {verdict['val_fraction']}, "
                         "not between 0 and 1; install the same effai on every device")
    source: str | None = None
    try:   # anything that fails here is reported to the coordinator, which names this device and aborts the run
        if fail_after == 0:
            os._exit(17)   # simulated crash before the process group: no report, no goodbye
        stream = None
        if not spec.send_images:
            source = data if data is not None else spec.data if _is_random(spec.data) else None
            if source is None:
                raise UsageError(f"the coordinator at {address} streams --data {_clean(spec.data, 200)}; a device "
                                 "reads only the data its own command line names: start it with --data (its copy of "
                                 "that data set), or run the coordinator with --send-images")
            c, h, w = card.input_size
            if _is_random(source) and spec.images * c * h * w * 4 > MAX_RANDOM_BYTES:
                raise UsageError(f"the coordinator asks for {spec.images:,} random images, over this device's "
                                 f"{MAX_RANDOM_BYTES >> 30} GiB limit; stream fewer --images")
            stream = load_stream(source, tuple(card.input_size), list(card.mean), list(card.std), spec.images,
                                 verdict["val_seed"], float(verdict["val_fraction"]))
    except Exception as e:
        error = str(e) if isinstance(e, EffaiError) else (f"loading its inputs ({source}) failed: "
                                                          f"{type(e).__name__}: {_first_line(e)}")
        _report(store, rank, error, usage=isinstance(e, UsageError))
        if isinstance(e, EffaiError):
            raise
        raise EffaiError(error) from e
    wait_s = spec.timeout_s + START_MARGIN_S   # the coordinator's clock: it says start or abort within its timeout
    try:
        store.set(f"{KEY}/ready/{rank}", json.dumps({"ok": True, "data": source,
                                                     "stream": None if stream is None else stream_digest(stream)}))
        store.set_timeout(_td(wait_s))
        start = _message(store.get(f"{KEY}/start"), _START, f"the start message of the coordinator at {address}")
        store.add(f"{KEY}/start_ack", 1)
        if start["ok"]:
            store.set(f"{KEY}/joining/{rank}", "1")   # lets the coordinator name a device that dies from here on
    except UsageError:
        raise
    except Exception as e:
        raise _coordinator_failed(e, address, f"did not start the run within {wait_s:g}s of this device being "
                                              "ready") from e
    if not start["ok"]:
        raise EffaiError(_clean(start.get("error")))
    pg = _init_group(store, rank, n + 1, spec.timeout_s, address, store.local_address)
    coordinator = f"the coordinator at {address}"
    timings: list[tuple[float, float, float]] = []
    batches = spec.images // spec.batch_size
    while True:
        ctrl = torch.empty(2, dtype=torch.int64)
        _wait(pg.recv([ctrl], 0, 0), coordinator, "sending the next request", spec.timeout_s)
        b, bsz = int(ctrl[0]), int(ctrl[1])
        if b == STOP:
            break
        if bsz != spec.batch_size or not 0 <= b < batches or len(timings) >= spec.warmup + batches:
            raise EffaiError(f"{coordinator} asked for batch {b} of {bsz} images, outside its own run spec "
                             f"(batch_size {spec.batch_size}, {batches} batches); the run is aborted")
        if stream is None:
            x = torch.empty(bsz, *card.input_size)
            _wait(pg.recv([x], 0, 0), coordinator, "sending the images", spec.timeout_s)
        else:
            x = stream.batch(b, bsz)
        t0 = time.perf_counter()
        with torch.no_grad():
            f = part.model(x).contiguous()
        t1 = time.perf_counter()
        _wait(pg.send([f], 0, 0), coordinator, "receiving this device's CLS feature", spec.timeout_s)
        timings.append(((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, f.numel() * f.element_size()))
        if fail_after is not None and len(timings) >= fail_after:
            os._exit(17)   # simulated crash: no stop, no goodbye
    _wait(pg.send([torch.tensor(timings, dtype=torch.float64).reshape(-1, 3)], 0, 0), coordinator,
          "receiving the timings", spec.timeout_s)
    return {"rank": rank, "part": part.index, "coordinator": address, "batches": len(timings),
            "compute_ms": _ms([t[0] for t in timings]), "send_ms": _ms([t[1] for t in timings]),
            "bytes_sent": int(sum(t[2] for t in timings))}


def _report(store: Any, rank: int, error: str, usage: bool = False) -> None:
    """Tell the coordinator why this device cannot run (it names the device and aborts the run for everyone)."""
    try:
        store.set(f"{KEY}/ready/{rank}", json.dumps({"ok": False, "error": error, "usage": usage}))
    except Exception:
        pass   # the coordinator has gone: this device's own error is all there is to say
