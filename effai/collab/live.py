"""`effai collab serve/run`: the server half in one process, the device half in another, over localhost TCP through
DeViT's authenticated channel (token HMAC handshake, encrypted frames, exact bind, bounded waits; no pickle: codes
travel as q-bit packed bytes, logits as float32 bytes). One fixed split per run. docs/split.md, "Live run".
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from effai.errors import EffaiError, UsageError

END = b""   # an empty request: the device is done


def _load(root: Path) -> tuple[Any, dict[str, Any]]:
    """(predictor, manifest) of one half's artifact dir, hash-checked."""
    from effai.export import manifest as manifest_io
    from effai.export.targets import TARGETS
    from effai.export.verify import lowered_from_manifest

    m = manifest_io.read(root)
    problems = manifest_io.check_files(root, m)
    if problems:
        raise UsageError(f"{root} failed its hash check ({'; '.join(problems[:3])}); re-export it with effai split")
    target = TARGETS.get(str(m.get("target")))
    pred = target.load(root, lowered_from_manifest(root, m))
    if isinstance(pred, str):
        raise UsageError(f"{root}: {m['target']} artifacts cannot run here: {pred}")
    return pred, m


def read_split(split_dir: Path, target: str) -> dict[str, Any]:
    from effai.files import read_json

    rec_path = Path(split_dir) / "split.json"
    if not rec_path.is_file():
        raise UsageError(f"{split_dir} has no split.json; export one with effai split MODEL --at POINT --ae RUN")
    rec = read_json(rec_path, str(rec_path))
    if not isinstance(rec, dict) or rec.get("schema") != "effai.split/1":
        raise UsageError(f"{rec_path} is not an effai.split/1 record; re-export it")
    if target not in rec.get("targets", {}):
        raise UsageError(f"{split_dir} has no {target} halves; it has: {', '.join(rec.get('targets', {}))}")
    if not rec.get("autoencoder"):
        raise UsageError(f"{split_dir} was exported without an autoencoder; the live run sends codes: export with "
                         "--ae RUN")
    return rec


def pack(levels: np.ndarray, bits: int) -> bytes:
    """Integer levels 0..2^bits-1 -> ceil(n * bits / 8) bytes (little bit order within each value)."""
    v = np.rint(levels.reshape(-1)).astype(np.uint8)
    b = ((v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return np.packbits(b.reshape(-1)).tobytes()


def unpack(data: bytes, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    n = math.prod(shape)
    if len(data) != math.ceil(n * bits / 8):
        raise EffaiError(f"code of {len(data)} bytes, expected {math.ceil(n * bits / 8)} for {shape} at {bits} bits:"
                         " the device runs another split; serve and run the same split export")
    b = np.unpackbits(np.frombuffer(data, np.uint8))[: n * bits].reshape(n, bits)
    return (b * (1 << np.arange(bits))).sum(1).astype(np.float32).reshape(shape)


def serve(split_dir: Path, target: str, host: str, port: int, token: str, wait_s: float = 60.0,
          on_ready: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Serve the server half until the device says it is done; every wait is bounded by `wait_s`."""
    import torch.distributed as dist

    from effai.devit_runtime.channel import Rendezvous

    rec = read_split(split_dir, target)
    server, _m = _load(Path(split_dir) / target / "server")
    shape = tuple(rec["targets"][target]["server"]["input_shape"])
    bits = int(rec["autoencoder"]["bits"])
    rv = Rendezvous(host, port, token, timeout_s=wait_s)
    served, ms = 0, []
    try:
        rv.store.set("meta", json.dumps({"point": rec["point"], "bits": bits, "code_shape": list(shape),
                                         "model": rec["model"], "target": target}))
        if on_ready:
            on_ready(rv.port)
        while True:
            try:
                data = rv.store.get(f"req/{served}", wait_s)
            except dist.DistStoreError:
                raise EffaiError(f"no request from the device within {wait_s:g}s (after {served} served); start "
                                 "`effai collab run` with this address and token, or raise --wait") from None
            if data == END:
                break
            t0 = time.perf_counter()
            logits = server.run([unpack(data, bits, shape)])[0]
            ms.append((time.perf_counter() - t0) * 1e3)
            rv.store.set(f"resp/{served}", np.ascontiguousarray(logits, np.float32).tobytes())
            rv.store.delete_key(f"req/{served}")
            served += 1
        time.sleep(0.2)   # let the device read the last answer before the channel closes
    finally:
        rv.close()
    return {"served": served, "server_ms_median": statistics.median(ms) if ms else None, "refused": rv.refused}


def run(split_dir: Path, target: str, host: str, port: int, token: str, n: int = 100, wait_s: float = 60.0,
        local_dir: Path | None = None) -> dict[str, Any]:
    """The device: n held-out images through the device half, codes to the server, logits back; end-to-end
    latency per image, top-1, bytes per request; with `local_dir` (the whole model exported) the all-local
    latency of the same images in the same runtime."""
    import torch.distributed as dist

    from effai import zoo
    from effai.data.datasets import load_part, normalized
    from effai.devit_runtime.channel import connect

    rec = read_split(split_dir, target)
    bits = int(rec["autoencoder"]["bits"])
    card = zoo.resolve_card(rec["model"])
    if not card.extra.get("eval_data") and card.bundled_weights:
        card = zoo.create(rec["model"]).card
    spec = card.extra.get("eval_data")
    if not spec:
        raise UsageError(f"{rec['model']} has no labelled data on its card; the live run needs it")
    c, h, _ = card.input_size
    va, what = load_part(spec, h, c, card.extra.get("split"), "val")
    x = normalized(va.x[:n], card.mean, card.std).numpy()
    y = va.y[:n].numpy()
    loc: list[float] = []
    if local_dir is not None:   # first, alone: ONNX Runtime's thread pools of two live sessions disturb each other
        whole, _ = _load(Path(local_dir))
        for i in range(x.shape[0]):
            t0 = time.perf_counter()
            whole.run([x[i:i + 1]])
            loc.append((time.perf_counter() - t0) * 1e3)
        del whole
    device, _m = _load(Path(split_dir) / target / "device")
    try:
        store = connect(host, port, token, wait_s)
    except OSError as e:
        raise EffaiError(f"cannot reach the server at {host}:{port} within {wait_s:g}s ({e}); start `effai collab "
                         "serve` there first") from None
    e2e, dev_ms, correct, nbytes = [], [], 0, 0
    try:
        meta = json.loads(store.get("meta"))
        if meta.get("point") != rec["point"] or meta.get("bits") != bits:
            raise UsageError(f"the server runs split {meta.get('point')} at {meta.get('bits')} bits, this device "
                             f"{rec['point']} at {bits}: serve and run the same split export")
        for i in range(x.shape[0]):
            t0 = time.perf_counter()
            code = device.run([x[i:i + 1]])[0]
            t1 = time.perf_counter()
            payload = pack(code, bits)
            store.set(f"req/{i}", payload)
            store.wait([f"resp/{i}"])
            logits = np.frombuffer(store.get(f"resp/{i}"), np.float32)
            e2e.append((time.perf_counter() - t0) * 1e3)
            dev_ms.append((t1 - t0) * 1e3)
            nbytes = len(payload)
            correct += int(logits.argmax() == y[i])
        store.set(f"req/{x.shape[0]}", END)
    except (dist.DistNetworkError, dist.DistStoreError, dist.DistError) as e:
        raise EffaiError(f"the server at {host}:{port} went away or stopped answering ({e}); nothing was "
                         "written") from None
    finally:
        store.close()
    out = {"point": rec["point"], "target": target, "images": int(x.shape[0]), "data": what,
           "top1": correct / x.shape[0], "bytes_per_request": nbytes,
           "e2e_ms_median": statistics.median(e2e), "device_ms_median": statistics.median(dev_ms)}
    if loc:
        out["local_ms_median"] = statistics.median(loc)
    return out
