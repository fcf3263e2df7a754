"""The coordinator of a collaborative run (rank 0): hosts the rendezvous, checks the N devices, says go or refuse,
then streams the images' batch requests and fuses the N CLS features (B x d_sub float32 each: the only data on the
network) with the fusion head. Every wait is bounded by `timeout_s`; a failing device is named, never a hang.
Protocol and measurements: docs/distill.md, "effai/devit_runtime/coordinator.py, device.py, messages.py, network.py".
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from effai.devit_runtime import channel
from effai.devit_runtime.channel import PROTOCOL
from effai.devit_runtime.inputs import Stream, load_stream
from effai.devit_runtime.messages import (KEY, READY_FIELDS, STOP, RunSpec, clean, describe, is_random,
                                          parse_device_info, parse_message, stream_digest, summary_ms)
from effai.devit_runtime.network import (DeviceExited, first_line, format_address, init_group, parse_address,
                                         wait)
from effai.devit_runtime.parts import Decomposition, check_part
from effai.errors import EffaiError, UsageError

ACK_S = 3.0           # how long an aborting coordinator lets the devices read why before it exits


@dataclass
class RunResult:
    logits: torch.Tensor          # (images, K) of the timed batches, in stream order
    labels: torch.Tensor | None
    report: dict[str, Any]


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
        raise UsageError(f"the coordinator cannot listen on {host}:{port} ({first_line(e)}); choose a free port or "
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
            peers[r] = parse_device_info(text, r)
        for r, info in peers.items():
            check_part(fusion, info, f"{describe(r, info)} serving {clean(info['path'], 300)}", index=r - 1)
            expected = decomp.part_sha256(r - 1)
            if info["sha256"] != expected:
                raise UsageError(f"{describe(r, info)} serves {clean(info['path'], 300)}, whose weights are not "
                                 f"part {r - 1} of this run (sha256 {clean(info['sha256'])[:12]}…, the run's "
                                 f"{expected[:12]}…); copy the run's part_{r - 1}/model.safetensors to that device")
        part_card = decomp.parts[0].card
        size, mean, std = tuple(part_card.input_size), list(part_card.mean), list(part_card.std)
        dataset = decomp.manifest.get("dataset", {})
        if "val_seed" not in dataset and not is_random(spec.data):
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
    pg = init_group(store, 0, n + 1, spec.timeout_s, address, rv.bound, watch)
    return _coordinator_loop(decomp, pg, peers, stream, spec, address)


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
            late = ", ".join(describe(r, peers[r]) for r in sorted(peers) if r not in states)
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
                states[r] = parse_message(store.get(f"{KEY}/ready/{r}"), READY_FIELDS,
                                          f"{describe(r, peers[r])}'s ready report")
            except UsageError as e:
                states[r] = {"ok": False, "error": str(e), "usage": True}
    return states


def _reported_failure(states: dict[int, dict[str, Any]], peers: dict[int, dict[str, Any]], spec: RunSpec,
                      digest: str | None) -> EffaiError | None:
    for r, state in states.items():
        if not state["ok"]:
            return (UsageError if state.get("usage") else EffaiError)(
                f"{describe(r, peers[r])} failed before joining the run: {clean(state.get('error'))}")
        if digest is not None and state.get("stream") != digest:
            return UsageError(f"{describe(r, peers[r])} reads other images (its --data "
                              f"{clean(state.get('data'), 200)}) than the coordinator (--data {clean(spec.data, 200)}"
                              "); start every device with --data naming its copy of the coordinator's data, or run "
                              "the coordinator with --send-images")
    return None


def _dead(e: EffaiError) -> set[int]:
    """The rank whose process is known to be gone (it cannot ack anything)."""
    return {e.rank} if isinstance(e, DeviceExited) else set()


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
    who = {r: describe(r, peers[r]) for r in peers}
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
            wait(work, who[r], what, spec.timeout_s)
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
        wait(work, who[r], "receiving the stop", spec.timeout_s)
    device_t = {r: torch.empty(steps, 3, dtype=torch.float64) for r in peers}   # compute ms, send ms, bytes per step
    for r, work in [(r, pg.recv([device_t[r]], r, 0)) for r in peers]:
        wait(work, who[r], "sending its timings", spec.timeout_s)
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
        "end_to_end_ms": summary_ms(e2e), "per_image_ms": statistics.median(e2e) / bsz,
        "throughput_images_per_s": images / (sum(e2e) / 1e3), "fusion_ms": summary_ms(fuse_ms),
        "network_ms": summary_ms(network),   # coordinator wait minus the slowest device's compute, per batch
        "feature_bytes_per_image": n * d * 4, "image_bytes_per_image": n * image_bytes,
        "devices": [{"rank": r, "part": r - 1, "host": peers[r].get("host"), "pid": peers[r].get("pid"),
                     "params": peers[r].get("params"), "compute_ms": summary_ms(compute[r]),
                     "send_ms": summary_ms(device_t[r][spec.warmup:, 1].tolist()),
                     "bytes_sent": int(device_t[r][:, 2].sum()),             # measured: numel x element size
                     "bytes_per_image": float(device_t[r][spec.warmup:, 2].sum()) / images} for r in sorted(peers)],
    }
    if labels is not None:
        report["accuracy"] = float((out.argmax(1) == labels).float().mean())
    return RunResult(out, labels, report)
