"""The wire messages of a collaborative run and their strict parsing: the run spec, what a device publishes, the
coordinator's verdict, ready and start. A peer's message with unknown or missing fields, wrong types or values out of
range is a UsageError naming it; a peer's text is printed cleaned. Protocol: docs/distill.md,
"effai/devit_runtime/coordinator.py, device.py, messages.py, network.py".
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import statistics
from dataclasses import dataclass, fields
from typing import Any

from effai.devit_runtime import channel
from effai.devit_runtime.channel import PROTOCOL
from effai.devit_runtime.inputs import Stream
from effai.devit_runtime.parts import Part
from effai.errors import UsageError
from effai.files import loads_json

KEY = "effai-devit"
STOP = -1
MAX_IMAGES = 1_000_000


@dataclass(frozen=True)
class RunSpec:
    data: str = "random"          # random[:SEED] | digits | DIR | X.npz (held-out split), read by every process
    images: int = 64              # images to stream (whole batches)
    batch_size: int = 1
    warmup: int = 2               # untimed batches first (allocator, caches, connections)
    timeout_s: float = 30.0       # bound on every wait: joining, each send and receive
    send_images: bool = False     # the coordinator sends each batch to the devices (else devices read it locally)


SPEC_TYPES = {"data": str, "images": int, "batch_size": int, "warmup": int, "timeout_s": float, "send_images": bool}


def spec_from_peer(obj: Any, address: str) -> RunSpec:
    """The coordinator's RunSpec as a device accepts it: exactly RunSpec's fields, each of its type and in range."""
    what = f"the coordinator at {address} sent a run spec that"
    if not isinstance(obj, dict):
        raise UsageError(f"{what} is not an object; install the same effai on every device")
    names = {f.name for f in fields(RunSpec)}
    unknown, missing = sorted(set(obj) - names), sorted(names - set(obj))
    if unknown or missing:
        raise UsageError(f"{what} has {'unknown' if unknown else 'no'} field(s) {clean(', '.join(unknown or missing))}"
                         "; install the same effai on every device")
    for name, kind in SPEC_TYPES.items():
        if not typed(obj[name], kind):
            raise UsageError(f"{what} has {name} of the wrong type ({type(obj[name]).__name__}, not {kind.__name__})")
    spec = RunSpec(**obj)
    if not (1 <= spec.images <= MAX_IMAGES and 1 <= spec.batch_size <= spec.images and 0 <= spec.warmup <= 100_000
            and 0 < spec.timeout_s <= channel.MAX_WAIT_S and len(spec.data) <= 1000):
        raise UsageError(f"{what} is out of range (images 1..{MAX_IMAGES:,}, batch_size 1..images, warmup "
                         f"0..100000, timeout_s 0..{channel.MAX_WAIT_S:g}, data up to 1000 characters)")
    return spec


def typed(value: Any, kind: Any) -> bool:
    if kind is bool or kind is int:
        return type(value) is kind
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str) and len(value) <= 4096
    if kind == "str?":
        return value is None or typed(value, str)
    if kind in ("ints", "floats"):
        return isinstance(value, list) and len(value) <= 100_000 and all(
            typed(v, int if kind == "ints" else float) for v in value)
    return isinstance(value, kind)


DEVICE_FIELDS = {"protocol": int, "part": int, "parts": int, "split_hash": str, "d_sub": int, "classes": "ints",
           "sha256": str, "path": str, "host": str, "pid": int, "params": int, "input_size": "ints", "mean": "floats",
           "std": "floats"}
VERDICT_FIELDS = {"ok": bool, "protocol": int, "spec": dict, "val_seed": int, "val_fraction": float, "error": "str?",
            "usage": bool}
READY_FIELDS = {"ok": bool, "error": "str?", "usage": bool, "stream": "str?", "data": "str?"}
START_FIELDS = {"ok": bool, "error": "str?"}


def parse_message(raw: bytes, schema: dict[str, Any], what: str, required: tuple[str, ...] = ("ok",)) -> dict[str, Any]:
    """A rendezvous message parsed and checked against `schema` (name -> type): unknown fields, missing required
    ones and wrong types are a UsageError naming `what`."""
    obj = loads_json(raw, what)
    if not isinstance(obj, dict):
        raise UsageError(f"{what} is not a JSON object; install the same effai on every device")
    unknown = sorted(set(obj) - set(schema))
    missing = [k for k in required if k not in obj]
    if unknown or missing:
        raise UsageError(f"{what} has {'unknown' if unknown else 'no'} field(s) {clean(', '.join(unknown or missing))}"
                         "; install the same effai on every device")
    for name, value in obj.items():
        if not typed(value, schema[name]):
            raise UsageError(f"{what} has {name} of the wrong type; install the same effai on every device")
    return obj


def clean(text: Any, limit: int = 600) -> str:
    """A peer's text as this process prints it: printable characters only (no terminal escapes), bounded."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[:limit] + "…"


def stream_digest(stream: Stream) -> str:
    """sha256 of the normalized images: the coordinator checks that every device reads the images it fuses."""
    h = hashlib.sha256(repr(tuple(stream.x.shape)).encode())
    h.update(stream.x.contiguous().numpy().tobytes())
    return h.hexdigest()


def is_random(data: str) -> bool:
    return data == "random" or data.startswith("random:")


def describe(rank: int, info: dict[str, Any] | None) -> str:
    where = f", {clean(info.get('host'), 100)} pid {clean(info.get('pid'), 20)}" if info else ""
    return f"device rank {rank} (part {rank - 1}{where})"


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {"median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "mean": statistics.fmean(s),
            "min": s[0], "max": s[-1]}


def parse_device_info(raw: bytes, rank: int) -> dict[str, Any]:
    """What device `rank` published on joining, checked: its protocol first (an older effai is named as such),
    then every field's type."""
    what = f"{describe(rank, None)}'s description"
    obj = loads_json(raw, what)
    theirs = obj.get("protocol", 1) if isinstance(obj, dict) else None
    if theirs != PROTOCOL:
        raise UsageError(f"{describe(rank, obj if isinstance(obj, dict) else None)} runs effai devit protocol "
                         f"{clean(theirs, 20)}, the coordinator {PROTOCOL}: install the same effai on every device")
    return parse_message(raw, DEVICE_FIELDS, what, required=tuple(DEVICE_FIELDS))


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
