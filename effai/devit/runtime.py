"""DeViT collaborative inference on torch.distributed: gloo over TCP, one process per device, works across hosts.

    rank 0       coordinator: holds the fusion head; per batch it asks every device for batch b, receives the N CLS
                 features (B x d_sub float32 each: the only data on the network) and fuses them into logits
    rank i + 1   device i: holds part i; computes its CLS feature for batch b and sends it to rank 0

Rendezvous is a TCPStore the coordinator hosts at HOST:PORT. Before any data flows each device publishes what it
holds (protocol version, part index, split hash, width, classes) and the coordinator answers go or refuse (another
effai devit protocol, parts of another decomposition, the wrong part, a width the fusion head does not take). After
a go each device loads its inputs and reports ready or why it cannot; only when all N are ready does the coordinator
say start and the N + 1 processes join the gloo process group, so a device that fails before the group is named with
its own error at once instead of surfacing as a rendezvous timeout. On an abort every device that did not fail is
given up to 3 s to read why. Every wait is bounded by the coordinator's `timeout_s` (a device follows the
coordinator's clock from the go on; its own --timeout bounds only reaching the coordinator and the go): a device
that never joins, reports ready and then never joins the process group, dies mid-stream or stops answering ends the
run with an EffaiError naming its rank, part and host, never a hang.

Measured per run: end-to-end latency per batch at the coordinator, each device's compute and send time, fusion time,
bytes each device sent, and the coordinator's wait not explained by the slowest device's compute (network +
protocol). Across hosts, set GLOO_SOCKET_IFNAME to the interface the devices share.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from effai.devit.inputs import Stream, load_stream
from effai.devit.parts import Decomposition, Part, check_part
from effai.errors import EffaiError, UsageError

KEY = "effai-devit"
STOP = -1
PROTOCOL = 2          # the rendezvous steps: 1 = join/verdict; 2 = + ready/start/joining. Both sides must agree
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


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(e).__name__   # gloo's "[file.cc:545] "
    return line.split(". ")[0][:200]


def _describe(rank: int, info: dict[str, Any] | None) -> str:
    where = f", {info.get('host')} pid {info.get('pid')}" if info else ""
    return f"device rank {rank} (part {rank - 1}{where})"


def _wait(work: Any, who: str, what: str, timeout_s: float) -> None:
    try:
        work.wait(_td(timeout_s))
    except Exception as e:
        raise DeviceLost(f"{who} {what} failed: {_first_line(e)}; it died, hung or the network dropped "
                         f"(timeout {timeout_s:g}s); the run is aborted") from e


def _init_group(store: Any, rank: int, world: int, timeout_s: float, address: str,
                watch: Callable[[], None] | None = None) -> None:
    """Join the gloo process group. When it does not form, say why: the coordinator ended the run (a device's view),
    a device that reported ready never joined (named), else the network."""
    try:
        dist.init_process_group("gloo", store=dist.PrefixStore(f"{KEY}/pg", store), rank=rank, world_size=world,
                                timeout=_td(timeout_s))
    except Exception as e:
        _shutdown()
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


def _shutdown() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {"median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "mean": statistics.fmean(s),
            "min": s[0], "max": s[-1]}


# --- coordinator ------------------------------------------------------------------------------------------------------
def coordinate(decomp: Decomposition, address: str, spec: RunSpec,
               on_listening: Callable[[str, int], None] | None = None,
               watch: Callable[[], None] | None = None) -> RunResult:
    """Host the rendezvous at `address` (port 0: any free port, passed to `on_listening`), wait for the N devices,
    check them, stream `spec.images` images through them and fuse their features. `watch` is called while waiting
    for devices to join and to get ready (run_local raises from it when a device process it started has exited)."""
    host, port = parse_address(address)
    fusion = decomp.fusion
    n = fusion.parts
    try:
        store = dist.TCPStore(host, port, is_master=True, timeout=_td(spec.timeout_s), wait_for_workers=False)
    except Exception as e:
        raise UsageError(f"the coordinator cannot listen on {host}:{port} ({_first_line(e)}); choose a free port or "
                         "an address of this host") from e
    address = f"{host}:{store.port}"
    if on_listening is not None:
        on_listening(host, store.port)
    peers = _await_devices(store, n, spec.timeout_s, address, watch)
    refusal: EffaiError | None = None
    try:
        for r, info in peers.items():
            theirs = info.get("protocol", 1)
            if theirs != PROTOCOL:
                raise UsageError(f"{_describe(r, info)} runs effai devit protocol {theirs}, the coordinator "
                                 f"{PROTOCOL}: install the same effai on every device")
        for r, info in peers.items():
            check_part(fusion, info, f"{_describe(r, info)} serving {info.get('path')}", index=r - 1)
        part_card = decomp.parts[0].card if decomp.parts else None
        size = tuple(part_card.input_size) if part_card else tuple(peers[1]["input_size"])
        mean, std = (list(part_card.mean), list(part_card.std)) if part_card else (peers[1]["mean"], peers[1]["std"])
        dataset = decomp.manifest.get("dataset", {})
        if "val_seed" not in dataset and not spec.data.startswith("random"):
            raise UsageError("the run's devit.json (its held-out split) is missing: copy it next to fusion/, or "
                             "stream --data random")
        val_seed, val_fraction = int(dataset.get("val_seed", 0)), float(dataset.get("val_fraction", 0.2))
        stream = load_stream(spec.data, size, mean, std, spec.images, val_seed,  # type: ignore[arg-type]
                             val_fraction)
        if stream.batches(spec.batch_size) < 1:
            raise UsageError(f"--images {spec.images} is fewer than one batch of {spec.batch_size}")
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
    _await_ready(store, peers, spec.timeout_s, address, watch)
    _init_group(store, 0, n + 1, spec.timeout_s, address, watch)
    try:
        return _coordinator_loop(decomp, peers, stream, spec, address)
    finally:
        _shutdown()


def _await_devices(store: Any, n: int, timeout_s: float, address: str,
                   watch: Callable[[], None] | None) -> dict[int, dict[str, Any]]:
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
            return {r: json.loads(store.get(f"{KEY}/device/{r}")) for r in range(1, n + 1)}
        if time.monotonic() > deadline:
            missing = [r for r in range(1, n + 1) if r not in joined]
            msg = (f"{', '.join(f'device rank {r} (part {r - 1})' for r in missing)} did not join the coordinator at "
                   f"{address} within {timeout_s:g}s; start `effai devit serve RUN --part I --coordinator {address}` "
                   "on each device, or check the address and firewall")
            _publish(store, n, {"ok": False, "protocol": PROTOCOL, "error": msg, "usage": False})
            _await_acks(store, len(joined), timeout_s)
            raise EffaiError(msg)
        time.sleep(0.02)


def _await_ready(store: Any, peers: dict[int, dict[str, Any]], timeout_s: float, address: str,
                 watch: Callable[[], None] | None) -> None:
    """After the go: wait until every device reports ready (its inputs loaded), then say start. A device that reports
    a failure, or whose process `watch` finds dead, aborts the run at once naming it; every device that did not fail
    (ready, or still loading) gets up to ACK_S to read why."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = _ready_states(store, peers)
        failure = _reported_failure(states, peers)
        if failure is None and watch is not None:
            try:
                watch()
            except EffaiError as e:   # a device that reported its own error and exited: its report (kind, exit code)
                time.sleep(0.05)      # wins over the generic exit notice; its last write may still be in flight
                failure = _reported_failure(_ready_states(store, peers), peers) or e
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
    """rank -> what the device reported after the go ({"ok": true} or its error), for those that have reported."""
    return {r: json.loads(store.get(f"{KEY}/ready/{r}")) for r in sorted(peers) if store.check([f"{KEY}/ready/{r}"])}


def _reported_failure(states: dict[int, dict[str, Any]], peers: dict[int, dict[str, Any]]) -> EffaiError | None:
    for r, state in states.items():
        if not state["ok"]:
            return (UsageError if state.get("usage") else EffaiError)(
                f"{_describe(r, peers[r])} failed before joining the run: {state['error']}")
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
        who = [_describe(r, json.loads(store.get(f"{KEY}/device/{r}"))) for r in missing]
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


def _coordinator_loop(decomp: Decomposition, peers: dict[int, dict[str, Any]], stream: Stream, spec: RunSpec,
                      address: str) -> RunResult:
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
        pending = [(r, "receiving the request", dist.isend(ctrl, dst=r)) for r in peers]
        if spec.send_images:
            x = stream.batch(b, bsz).contiguous()
            pending += [(r, "receiving the images", dist.isend(x, dst=r)) for r in peers]
        pending += [(r, "sending its CLS feature", dist.irecv(bufs[r - 1], src=r)) for r in peers]
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
    for r, work in [(r, dist.isend(stop, dst=r)) for r in peers]:
        _wait(work, who[r], "receiving the stop", spec.timeout_s)
    device_t = {r: torch.empty(steps, 3, dtype=torch.float64) for r in peers}   # compute ms, send ms, bytes per step
    for r, work in [(r, dist.irecv(device_t[r], src=r)) for r in peers]:
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
    """What a device publishes on joining; the coordinator checks it before its go."""
    card = part.card
    return {**part.info, "protocol": PROTOCOL, "path": str(part.path), "host": socket.gethostname(),
            "pid": os.getpid(), "params": sum(p.numel() for p in part.model.parameters()),
            "input_size": list(card.input_size), "mean": list(card.mean), "std": list(card.std)}


def serve(part: Part, address: str, timeout_s: float = 60.0, fail_after: int | None = None) -> dict[str, Any]:
    """Join the coordinator at `address` as device `part.index` (rank index + 1) and answer its requests until it
    says stop. `timeout_s` bounds reaching the coordinator and waiting for its go; from the go on the device follows
    the coordinator's own timeout. `fail_after` (tests only) kills this process without a goodbye after that many
    batches (0: right after the coordinator's go, before joining the process group)."""
    host, port = parse_address(address)
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=_td(timeout_s))
    except Exception as e:
        raise EffaiError(f"cannot reach the coordinator at {address} within {timeout_s:g}s ({_first_line(e)}); start "
                         "`effai devit run` there first, or check the address and firewall") from e
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
        verdict = json.loads(store.get(f"{KEY}/verdict/{rank}"))
        store.add(f"{KEY}/ack", 1)
    except Exception as e:
        if not isinstance(e, dist.DistNetworkError):   # the coordinator will find out at once, after its go
            _report(store, rank, f"gave up waiting for the coordinator's go after {timeout_s:g}s (its --timeout); "
                                 "give every device a --timeout at least the coordinator's")
        raise _coordinator_failed(e, address, f"did not answer within {timeout_s:g}s") from e
    if not verdict["ok"]:
        raise (UsageError if verdict.get("usage") else EffaiError)(verdict["error"])
    theirs = verdict.get("protocol", 1)
    if theirs != PROTOCOL:
        raise UsageError(f"the coordinator at {address} runs effai devit protocol {theirs}, this device {PROTOCOL}: "
                         "install the same effai on every device")
    spec = RunSpec(**verdict["spec"])
    try:   # anything that fails here is reported to the coordinator, which names this device and aborts the run
        if fail_after == 0:
            os._exit(17)   # simulated crash before the process group: no report, no goodbye
        stream = None if spec.send_images else load_stream(spec.data, tuple(card.input_size), list(card.mean),
                                                          list(card.std), spec.images, int(verdict["val_seed"]),
                                                          float(verdict.get("val_fraction", 0.2)))
    except Exception as e:
        error = str(e) if isinstance(e, EffaiError) else (f"loading its inputs ({spec.data}) failed: "
                                                          f"{type(e).__name__}: {_first_line(e)}")
        _report(store, rank, error, usage=isinstance(e, UsageError))
        if isinstance(e, EffaiError):
            raise
        raise EffaiError(error) from e
    wait_s = spec.timeout_s + START_MARGIN_S   # the coordinator's clock: it says start or abort within its timeout
    try:
        store.set(f"{KEY}/ready/{rank}", json.dumps({"ok": True}))
        store.set_timeout(_td(wait_s))
        start = json.loads(store.get(f"{KEY}/start"))
        store.add(f"{KEY}/start_ack", 1)
        if start["ok"]:
            store.set(f"{KEY}/joining/{rank}", "1")   # lets the coordinator name a device that dies from here on
    except Exception as e:
        raise _coordinator_failed(e, address, f"did not start the run within {wait_s:g}s of this device being "
                                              "ready") from e
    if not start["ok"]:
        raise EffaiError(start["error"])
    _init_group(store, rank, n + 1, spec.timeout_s, address)
    coordinator = f"the coordinator at {address}"
    timings: list[tuple[float, float, float]] = []
    try:
        while True:
            ctrl = torch.empty(2, dtype=torch.int64)
            _wait(dist.irecv(ctrl, src=0), coordinator, "sending the next request", spec.timeout_s)
            b, bsz = int(ctrl[0]), int(ctrl[1])
            if b == STOP:
                break
            if stream is None:
                x = torch.empty(bsz, *card.input_size)
                _wait(dist.irecv(x, src=0), coordinator, "sending the images", spec.timeout_s)
            else:
                x = stream.batch(b, bsz)
            t0 = time.perf_counter()
            with torch.no_grad():
                f = part.model(x).contiguous()
            t1 = time.perf_counter()
            _wait(dist.isend(f, dst=0), coordinator, "receiving this device's CLS feature", spec.timeout_s)
            timings.append(((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, f.numel() * f.element_size()))
            if fail_after is not None and len(timings) >= fail_after:
                os._exit(17)   # simulated crash: no stop, no goodbye
        _wait(dist.isend(torch.tensor(timings, dtype=torch.float64).reshape(-1, 3), dst=0), coordinator,
              "receiving the timings", spec.timeout_s)
    finally:
        _shutdown()
    return {"rank": rank, "part": part.index, "coordinator": address, "batches": len(timings),
            "compute_ms": _ms([t[0] for t in timings]), "send_ms": _ms([t[1] for t in timings]),
            "bytes_sent": int(sum(t[2] for t in timings))}


def _report(store: Any, rank: int, error: str, usage: bool = False) -> None:
    """Tell the coordinator why this device cannot run (it names the device and aborts the run for everyone)."""
    try:
        store.set(f"{KEY}/ready/{rank}", json.dumps({"ok": False, "error": error, "usage": usage}))
    except Exception:
        pass   # the coordinator has gone: this device's own error is all there is to say
