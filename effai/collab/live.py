"""`effai collab serve/run`: the server half in one process, the device half in another, over localhost TCP through
DeViT's authenticated channel (token HMAC handshake, encrypted frames, exact bind, bounded waits; no pickle: codes
travel as q-bit packed bytes, logits as float32 bytes). The server hosts one or more split exports of one model;
every request frame names its split, so a device running a trained MAHPPO policy (`--policy`) picks the split (and
the power) per request from what it measured. docs/split.md, "Live run".

Frames (inside the encrypted channel): request = u8 name length, split point name (UTF-8), the packed code;
answer = b"\x00" + f32 server ms + float32 logits, or b"\x01" + a one-line error (then the server stops).
"""

from __future__ import annotations

import json
import math
import statistics
import struct
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


OK_FRAME, ERR_FRAME = b"\x00", b"\x01"
_MS = struct.Struct("<f")


def request_frame(point: str, code: bytes) -> bytes:
    name = point.encode("utf-8")
    if not 0 < len(name) < 256:
        raise UsageError(f"split point name {point!r} must be 1-255 bytes")
    return bytes([len(name)]) + name + code


def parse_request(frame: bytes) -> tuple[str, bytes]:
    n = frame[0] if frame else 0
    if n == 0 or len(frame) < 1 + n:
        raise EffaiError(f"malformed request frame ({len(frame)} bytes): the device runs another protocol; update "
                         "effai on both sides")
    try:
        return frame[1:1 + n].decode("utf-8"), frame[1 + n:]
    except UnicodeDecodeError:
        raise EffaiError("malformed request frame (split name is not UTF-8); update effai on both sides") from None


def _records(split_dirs: list[Path], target: str) -> dict[str, tuple[Path, dict[str, Any]]]:
    """point -> (dir, split.json) for several exports of one model; duplicates and mixed models refused."""
    if not split_dirs:
        raise UsageError("give at least one split export directory (effai split MODEL --at POINT --ae RUN)")
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for d in split_dirs:
        rec = read_split(Path(d), target)
        if rec["point"] in out:
            raise UsageError(f"{d} and {out[rec['point']][0]} both hold split {rec['point']}; give each point once")
        first = next(iter(out.values()), None)
        if first and (first[1]["model"], first[1].get("weights_sha256")) != (rec["model"], rec.get("weights_sha256")):
            raise UsageError(f"{d} splits {rec['model']} but {first[0]} splits {first[1]['model']} (or other "
                             "weights); host exports of one model")
        out[rec["point"]] = (Path(d), rec)
    return out


def serve(split_dirs: list[Path] | Path, target: str, host: str, port: int, token: str, wait_s: float = 60.0,
          on_ready: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Serve the server halves of every export in `split_dirs` until the device says it is done; every wait is
    bounded by `wait_s`. A frame naming a split this server does not host is answered with an error frame and ends
    the run with a one-line error."""
    import torch.distributed as dist

    from effai.devit_runtime.channel import Rendezvous

    if isinstance(split_dirs, (str, Path)):
        split_dirs = [Path(split_dirs)]
    recs = _records(list(split_dirs), target)
    halves = {}
    for point, (d, rec) in recs.items():
        server, _m = _load(d / target / "server")
        halves[point] = (server, tuple(rec["targets"][target]["server"]["input_shape"]),
                         int(rec["autoencoder"]["bits"]))
    rec0 = next(iter(recs.values()))[1]
    rv = Rendezvous(host, port, token, timeout_s=wait_s)
    served, ms = 0, []
    per_point: dict[str, int] = {p: 0 for p in halves}
    try:
        rv.store.set("meta", json.dumps({"splits": {p: {"bits": b, "code_shape": list(s)}
                                                    for p, (_h, s, b) in halves.items()},
                                         "model": rec0["model"], "weights_sha256": rec0.get("weights_sha256"),
                                         "target": target, "protocol": 2}))
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
            try:
                point, code = parse_request(data)
                if point not in halves:
                    raise EffaiError(f"the device asked for split {point}, but this server hosts "
                                     f"{', '.join(halves)}; serve that split's export too (effai collab serve DIR...)")
                server, shape, bits = halves[point]
                t0 = time.perf_counter()
                logits = server.run([unpack(code, bits, shape)])[0]
                t_ms = (time.perf_counter() - t0) * 1e3
            except EffaiError as e:
                rv.store.set(f"resp/{served}", ERR_FRAME + str(e).encode("utf-8"))
                time.sleep(0.2)   # let the device read the error before the channel closes
                raise
            ms.append(t_ms)
            per_point[point] += 1
            rv.store.set(f"resp/{served}", OK_FRAME + _MS.pack(t_ms) +
                         np.ascontiguousarray(logits, np.float32).tobytes())
            rv.store.delete_key(f"req/{served}")
            served += 1
        time.sleep(0.2)   # let the device read the last answer before the channel closes
    finally:
        rv.close()
    return {"served": served, "served_per_split": per_point, "server_ms_median": statistics.median(ms) if ms else None,
            "refused": rv.refused}


class PolicyChooser:
    """Runs a saved MAHPPO policy on one device of a live run. Its observation is built like the environment's
    (`SplitInferenceEnv.OBS_LAYOUT`): the own channel gain is derived from the throughput measured on the last
    request that crossed the link (before the first, the fetch of the server's description; `gain_from_rate`: the Shannon rate inverted at the power used, over the environment's bandwidth shared
    by its devices); the others' mean gain, which one device cannot see, is taken equal to its own; the round
    fraction counts requests modulo the episode length. Options the live run cannot execute (a split the server or
    this device lacks; local without --local) are masked out of the categorical head."""

    def __init__(self, policy_path: Path, available: set[str], agent: int = 0) -> None:
        from effai.rl.mahppo import MAHPPO

        self.agent = MAHPPO.load(policy_path)
        info = self.agent.env_info
        if info.get("obs_layout") != "own_gain_db_scaled,others_mean_gain_db_scaled,round_fraction":
            raise UsageError(f"{policy_path} was trained on another environment ({info.get('env')}, observation "
                             f"{info.get('obs_layout')!r}); train one with effai collab train-policy")
        if not 0 <= agent < self.agent.n_agents:
            raise UsageError(f"--agent {agent}: the policy has devices 0..{self.agent.n_agents - 1}")
        self.options = list(info.get("options", []))
        self.cfg = dict(info.get("config", {}))
        self.mask = np.array([o in available for o in self.options])
        if not self.mask.any():
            raise UsageError(f"{policy_path} chooses among {', '.join(self.options)}, none of which this run can "
                             f"execute ({', '.join(sorted(available)) or 'nothing'}); host those splits or pass "
                             "--local")
        self.idx = agent

    def power_w(self, u: float) -> float:
        lo, hi = float(self.cfg.get("p_min_w", 0.01)), float(self.cfg.get("p_max_w", 1.0))
        return lo + (float(np.clip(u, -1, 1)) + 1) / 2 * (hi - lo)

    def observe(self, rate_bps: float | None, power_w: float, i: int) -> np.ndarray:
        from effai.collab.env import gain_from_rate, gain_obs

        n = max(1, int(self.cfg.get("n_devices", self.agent.n_agents)))
        if rate_bps is None:
            g = 0.0
        else:
            gain = gain_from_rate(rate_bps, power_w, float(self.cfg.get("bandwidth_hz", 1e6)) / n,
                                  float(self.cfg.get("noise_dbm_hz", -174.0)))
            g = float(gain_obs(10 * np.log10(max(gain, 1e-30))))
        steps = max(1, int(self.cfg.get("episode_steps", 16)))
        return np.clip(np.array([g, g, (i % steps) / steps], np.float32), -10, 10)

    def choose(self, obs: np.ndarray) -> tuple[str, float]:
        import torch

        actor = self.agent.actors[self.idx]
        with torch.no_grad():
            cat, gauss = actor.dists(torch.as_tensor(obs)[None])
            logits = cat.logits[0].numpy().copy()
            u = float(gauss.mean[0, 0])
        logits[~self.mask] = -np.inf
        return self.options[int(np.argmax(logits))], self.power_w(u)


def run(split_dirs: list[Path] | Path, target: str, host: str, port: int, token: str, n: int = 100,
        wait_s: float = 60.0, local_dir: Path | None = None, policy: Path | None = None,
        agent: int = 0) -> dict[str, Any]:
    """The device: n held-out images; per image the split is the only export given, or with `policy` what the
    policy picks from its observation; the device half runs here, the code goes to the server named with its split,
    logits come back. End-to-end latency per image, top-1, bytes per request, the per-request choices; with
    `local_dir` (the whole model exported) the all-local latency of the same images (and "local" becomes an option
    the policy may pick)."""
    import torch.distributed as dist

    from effai import zoo
    from effai.data.datasets import load_part, normalized
    from effai.devit_runtime.channel import connect

    if isinstance(split_dirs, (str, Path)):
        split_dirs = [Path(split_dirs)]
    recs = _records(list(split_dirs), target)
    if policy is None and len(recs) > 1:
        raise UsageError(f"{len(recs)} split exports but no --policy: give one export, or a policy that picks "
                         "among them (effai collab train-policy)")
    rec0 = next(iter(recs.values()))[1]
    card = zoo.resolve_card(rec0["model"])
    if not card.extra.get("eval_data") and card.bundled_weights:
        card = zoo.create(rec0["model"]).card
    spec = card.extra.get("eval_data")
    if not spec:
        raise UsageError(f"{rec0['model']} has no labelled data on its card; the live run needs it")
    c, h, _ = card.input_size
    va, what = load_part(spec, h, c, card.extra.get("split"), "val")
    x = normalized(va.x[:n], card.mean, card.std).numpy()
    y = va.y[:n].numpy()
    loc: list[float] = []
    whole = None
    if local_dir is not None:   # first, alone: ONNX Runtime's thread pools of two live sessions disturb each other
        whole, _ = _load(Path(local_dir))
        for i in range(x.shape[0]):
            t0 = time.perf_counter()
            whole.run([x[i:i + 1]])
            loc.append((time.perf_counter() - t0) * 1e3)
        if policy is None:
            whole = None
    devices = {p: (_load(d / target / "device")[0], int(r["autoencoder"]["bits"])) for p, (d, r) in recs.items()}
    try:
        store = connect(host, port, token, wait_s)
    except OSError as e:
        raise EffaiError(f"cannot reach the server at {host}:{port} within {wait_s:g}s ({e}); start `effai collab "
                         "serve` there first") from None
    e2e, dev_ms, correct, nbytes = [], [], 0, []
    choices: list[dict[str, Any]] = []
    try:
        t_meta = time.perf_counter()
        meta_bytes = store.get("meta")
        meta_rate = 8 * len(meta_bytes) / max(time.perf_counter() - t_meta, 1e-6)   # the first throughput estimate
        meta = json.loads(meta_bytes)
        hosted = meta.get("splits") or {}
        if meta.get("model") != rec0["model"] or meta.get("weights_sha256") != rec0.get("weights_sha256"):
            raise UsageError(f"the server runs {meta.get('model')}, this device {rec0['model']} (or other weights): "
                             "serve and run exports of the same model")
        for p, (_dev, bits) in devices.items():
            if p in hosted and hosted[p].get("bits") != bits:
                raise UsageError(f"the server's split {p} uses {hosted[p].get('bits')}-bit codes, this device's "
                                 f"{bits}: serve and run the same split export")
        if policy is None and next(iter(devices)) not in hosted:
            raise UsageError(f"the server hosts {', '.join(hosted) or 'no split'}, this device runs "
                             f"{next(iter(devices))}: serve and run the same split export")
        chooser = None
        if policy is not None:
            available = {p for p in devices if p in hosted} | ({"local"} if whole is not None else set())
            chooser = PolicyChooser(Path(policy), available, agent)
        rate: float | None = meta_rate
        power = chooser.power_w(0.0) if chooser else 0.0
        sent = 0
        for i in range(x.shape[0]):
            point, power_i, obs = next(iter(devices)), None, None
            if chooser is not None:
                obs = chooser.observe(rate, power, i)
                point, power_i = chooser.choose(obs)
            t0 = time.perf_counter()
            if point == "local":
                logits = np.asarray(whole.run([x[i:i + 1]])[0], np.float32).reshape(-1)
                t1 = time.perf_counter()
                nb = 0
            else:
                device, bits = devices[point]
                code = device.run([x[i:i + 1]])[0]
                t1 = time.perf_counter()
                payload = request_frame(point, pack(code, bits))
                store.set(f"req/{sent}", payload)
                store.wait([f"resp/{sent}"])
                resp = store.get(f"resp/{sent}")
                sent += 1
                if resp[:1] == ERR_FRAME:
                    raise EffaiError(f"the server refused the request: {resp[1:].decode('utf-8', 'replace')}")
                srv_ms = _MS.unpack(resp[1:5])[0]
                logits = np.frombuffer(resp[5:], np.float32)
                nb = len(payload)
                net_s = (time.perf_counter() - t1) - srv_ms / 1e3
                rate = 8 * nb / max(net_s, 1e-6)
                power = power_i if power_i is not None else power
            e2e.append((time.perf_counter() - t0) * 1e3)
            dev_ms.append((t1 - t0) * 1e3)
            nbytes.append(nb)
            correct += int(logits.argmax() == y[i])
            if chooser is not None:
                choices.append({"split": point, "power_w": round(float(power_i), 4),
                                "obs": [round(float(v), 4) for v in obs]})
        store.set(f"req/{sent}", END)
    except (dist.DistNetworkError, dist.DistStoreError, dist.DistError) as e:
        raise EffaiError(f"the server at {host}:{port} went away or stopped answering ({e}); nothing was "
                         "written") from None
    finally:
        store.close()
    out: dict[str, Any] = {"point": ",".join(recs), "target": target, "images": int(x.shape[0]), "data": what,
                           "top1": correct / x.shape[0], "bytes_per_request": max(nbytes),
                           "bytes_per_request_mean": float(np.mean(nbytes)),
                           "e2e_ms_median": statistics.median(e2e), "device_ms_median": statistics.median(dev_ms)}
    if chooser is not None:
        out["policy"] = str(policy)
        out["choices"] = choices
        out["split_share"] = {p: sum(c["split"] == p for c in choices) / len(choices)
                              for p in sorted({c["split"] for c in choices})}
    if loc:
        out["local_ms_median"] = statistics.median(loc)
    return out
