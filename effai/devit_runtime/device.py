"""A device of a collaborative run (rank part + 1): joins the coordinator with the run's token, publishes what it
holds, loads its inputs after the go (its own --data, or the coordinator's images) and answers batch requests with
its part's CLS feature until told to stop. Waits are bounded; its own failure is reported to the coordinator.
Protocol: docs/distill.md, "effai/devit_runtime/coordinator.py, device.py, messages.py, network.py".
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from effai.devit_runtime import channel
from effai.devit_runtime.channel import PROTOCOL
from effai.devit_runtime.inputs import load_stream
from effai.devit_runtime.messages import (KEY, START_FIELDS, STOP, VERDICT_FIELDS, clean, device_info, is_random,
                                          parse_message, spec_from_peer, stream_digest, summary_ms)
from effai.devit_runtime.network import coordinator_failed, first_line, init_group, parse_address, wait
from effai.devit_runtime.parts import Part
from effai.errors import EffaiError, UsageError

MAX_RANDOM_BYTES = 4 << 30   # a device generates at most this much of a random stream the coordinator asks for
START_MARGIN_S = 5.0  # a ready device waits for start the coordinator's timeout_s plus this (the coordinator's clock)


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
        raise EffaiError(f"cannot reach the coordinator at {address} within {timeout_s:g}s ({first_line(e)}); start "
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
        raise coordinator_failed(e, address, "") from e
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
        raise coordinator_failed(e, address, f"did not answer within {timeout_s:g}s") from e
    verdict = parse_message(raw, VERDICT_FIELDS, f"the verdict of the coordinator at {address}")
    if not verdict["ok"]:
        raise (UsageError if verdict.get("usage") else EffaiError)(clean(verdict.get("error")))
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
            source = data if data is not None else spec.data if is_random(spec.data) else None
            if source is None:
                raise UsageError(f"the coordinator at {address} streams --data {clean(spec.data, 200)}; a device "
                                 "reads only the data its own command line names: start it with --data (its copy of "
                                 "that data set), or run the coordinator with --send-images")
            c, h, w = card.input_size
            if is_random(source) and spec.images * c * h * w * 4 > MAX_RANDOM_BYTES:
                raise UsageError(f"the coordinator asks for {spec.images:,} random images, over this device's "
                                 f"{MAX_RANDOM_BYTES >> 30} GiB limit; stream fewer --images")
            stream = load_stream(source, tuple(card.input_size), list(card.mean), list(card.std), spec.images,
                                 verdict["val_seed"], float(verdict["val_fraction"]))
    except Exception as e:
        error = str(e) if isinstance(e, EffaiError) else (f"loading its inputs ({source}) failed: "
                                                          f"{type(e).__name__}: {first_line(e)}")
        _report(store, rank, error, usage=isinstance(e, UsageError))
        if isinstance(e, EffaiError):
            raise
        raise EffaiError(error) from e
    wait_s = spec.timeout_s + START_MARGIN_S   # the coordinator's clock: it says start or abort within its timeout
    try:
        store.set(f"{KEY}/ready/{rank}", json.dumps({"ok": True, "data": source,
                                                     "stream": None if stream is None else stream_digest(stream)}))
        store.set_timeout(timedelta(seconds=wait_s))
        start = parse_message(store.get(f"{KEY}/start"), START_FIELDS,
                              f"the start message of the coordinator at {address}")
        store.add(f"{KEY}/start_ack", 1)
        if start["ok"]:
            store.set(f"{KEY}/joining/{rank}", "1")   # lets the coordinator name a device that dies from here on
    except UsageError:
        raise
    except Exception as e:
        raise coordinator_failed(e, address, f"did not start the run within {wait_s:g}s of this device being "
                                              "ready") from e
    if not start["ok"]:
        raise EffaiError(clean(start.get("error")))
    pg = init_group(store, rank, n + 1, spec.timeout_s, address, store.local_address)
    coordinator = f"the coordinator at {address}"
    timings: list[tuple[float, float, float]] = []
    batches = spec.images // spec.batch_size
    while True:
        ctrl = torch.empty(2, dtype=torch.int64)
        wait(pg.recv([ctrl], 0, 0), coordinator, "sending the next request", spec.timeout_s)
        b, bsz = int(ctrl[0]), int(ctrl[1])
        if b == STOP:
            break
        if bsz != spec.batch_size or not 0 <= b < batches or len(timings) >= spec.warmup + batches:
            raise EffaiError(f"{coordinator} asked for batch {b} of {bsz} images, outside its own run spec "
                             f"(batch_size {spec.batch_size}, {batches} batches); the run is aborted")
        if stream is None:
            x = torch.empty(bsz, *card.input_size)
            wait(pg.recv([x], 0, 0), coordinator, "sending the images", spec.timeout_s)
        else:
            x = stream.batch(b, bsz)
        t0 = time.perf_counter()
        with torch.no_grad():
            f = part.model(x).contiguous()
        t1 = time.perf_counter()
        wait(pg.send([f], 0, 0), coordinator, "receiving this device's CLS feature", spec.timeout_s)
        timings.append(((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, f.numel() * f.element_size()))
        if fail_after is not None and len(timings) >= fail_after:
            os._exit(17)   # simulated crash: no stop, no goodbye
    wait(pg.send([torch.tensor(timings, dtype=torch.float64).reshape(-1, 3)], 0, 0), coordinator,
          "receiving the timings", spec.timeout_s)
    return {"rank": rank, "part": part.index, "coordinator": address, "batches": len(timings),
            "compute_ms": summary_ms([t[0] for t in timings]), "send_ms": summary_ms([t[1] for t in timings]),
            "bytes_sent": int(sum(t[2] for t in timings))}


def _report(store: Any, rank: int, error: str, usage: bool = False) -> None:
    """Tell the coordinator why this device cannot run (it names the device and aborts the run for everyone)."""
    try:
        store.set(f"{KEY}/ready/{rank}", json.dumps({"ok": False, "error": error, "usage": usage}))
    except Exception:
        pass   # the coordinator has gone: this device's own error is all there is to say
