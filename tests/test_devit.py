"""DeViT: class split, DEKD relations, fusion head, the training pipeline on real digits, collaborative inference over
real gloo/TCP processes (equal to the single-process ensemble), failures (dead device, missing device, mixed
decompositions, widths) and export of a part and the fusion head."""

from __future__ import annotations

import copy
import json
import re
import threading
import time

import pytest
import torch

from effai import zoo
from effai.errors import EffaiError, UsageError
from effai.train.devit import DevitConfig, dekd, train_devit
from effai.zoo.devit_fusion import FusionHead, build_fusion_head
from effai.train.devit.split import split_classes, split_hash
from effai.zoo.features import FeatureCapture

from tests.helpers import DEVIT_SIZE as SIZE

TOKEN = "test-token-0123456789abcdef"       # the run's shared secret in the tests that coordinate in-process


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_npz, devit_teacher):
    """A 2-part decomposition trained for one epoch per stage on 240 digits (~10 s)."""
    root = tmp_path_factory.mktemp("devit")
    teacher = devit_teacher
    cfg = DevitConfig(teacher=str(teacher), parts=2, data=str(digits_npz), out=str(root / "run"), epochs=1,
                      finetune_epochs=1, ensemble_epochs=1, batch_size=32)
    return {"result": train_devit(cfg), "cfg": cfg, "dir": root / "run", "teacher": teacher, "root": root}


# --- split ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n", [(10, 2), (10, 3), (10, 4), (100, 7), (5, 5)])
def test_split_is_disjoint_complete_seeded(k, n):
    s = split_classes(k, n, seed=42)
    flat = [c for sub in s.subsets for c in sub]
    assert sorted(flat) == list(range(k)) and len(flat) == len(set(flat))          # complete, disjoint
    assert len(s.subsets) == n and max(map(len, s.subsets)) - min(map(len, s.subsets)) <= 1
    assert split_classes(k, n, seed=42) == s                                        # seeded
    assert split_classes(k, n, seed=7).subsets != s.subsets or k == n


def test_split_hash_changes_with_seed_and_parts():
    s = split_classes(10, 2, seed=42)
    assert s.hash == split_hash([list(x) for x in reversed(s.subsets)], 42)        # order of listing irrelevant
    assert split_classes(10, 2, seed=43).hash != s.hash
    assert split_classes(10, 5, seed=42).hash != s.hash
    assert split_hash(s.subsets, 43) != s.hash                                      # same subsets, other seed


def test_more_parts_than_classes_is_refused():
    with pytest.raises(UsageError, match="--parts 11 is more than the data's 10 classes.*between 1 and 10"):
        split_classes(10, 11)
    with pytest.raises(UsageError, match="needs --teacher"):
        DevitConfig()
    with pytest.raises(UsageError, match="alpha"):
        DevitConfig(teacher="t", alpha=1.5)


# --- DEKD -------------------------------------------------------------------------------------------------------------
def _vit(name: str, seed: int):
    torch.manual_seed(seed)
    return zoo.build(zoo.resolve_card(name).with_(input_size=(1, SIZE, SIZE), num_classes=4, label_set=None,
                                                   extra={"arch_kwargs": {"patch_size": 4}})).eval()


def _qkv(model, x):
    with FeatureCapture(model, [dekd.qkv_path(model)]) as cap, torch.no_grad():
        z = model(x)
    return z, cap.outputs[0]


def test_relation_kl_is_zero_for_the_same_features_and_positive_otherwise():
    x = torch.randn(3, 1, SIZE, SIZE)
    teacher, other, wide = _vit("vit_pico", 0), _vit("vit_pico", 1), _vit("vit_tiny", 2)
    _, qkv_t = _qkv(teacher, x)
    _, qkv_copy = _qkv(copy.deepcopy(teacher), x)
    heads = dekd.num_heads(teacher)
    assert all(float(r) == 0.0 for r in dekd.qkv_relation_terms(qkv_t, qkv_copy, heads, heads))   # X_s = X_t
    r_other = dekd.qkv_relation_terms(qkv_t, _qkv(other, x)[1], heads, heads)
    assert all(float(r) > 1e-4 for r in r_other)
    qkv_w = _qkv(wide, x)[1]                                          # 192 vs 96 wide: relations still comparable
    assert qkv_w.shape[-1] == 2 * qkv_t.shape[-1]
    r_wide = dekd.qkv_relation_terms(qkv_w, qkv_t, dekd.num_heads(wide), heads)
    assert all(torch.isfinite(r) and float(r) > 0 for r in r_wide)
    # R_Q by hand: KL(softmax(Q_t Q_t^T / sqrt(hd_t)) || softmax(Q_s Q_s^T / sqrt(hd_s))) per row, mean over rows
    q_t, q_s = qkv_w[..., :192], qkv_t[..., :96]
    p = torch.softmax(q_t @ q_t.transpose(1, 2) / 64 ** 0.5, -1)
    q = torch.softmax(q_s @ q_s.transpose(1, 2) / 32 ** 0.5, -1)
    assert torch.allclose(r_wide[0], (p * (p.log() - q.log())).sum(-1).mean(), rtol=1e-4)


def test_dekd_total_is_the_weighted_sum():
    z_s, z_t, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    rel = (torch.tensor(0.5), torch.tensor(2.0), torch.tensor(1.0))
    total, terms = dekd.dekd_loss(z_s, z_t, y, rel, alpha=0.5, gammas=(0.2, 0.1, 0.3))
    ce = torch.nn.functional.cross_entropy(z_s, y)
    hard = torch.nn.functional.cross_entropy(z_s, z_t.argmax(1))
    assert torch.allclose(total, 0.5 * ce + 0.5 * hard + 0.2 * 0.5 + 0.1 * 2.0 + 0.3 * 1.0)
    assert terms["r_k"] == 2.0


# --- fusion head ------------------------------------------------------------------------------------------------------
def test_fusion_head_widths_are_checked():
    head = FusionHead(parts=2, d_sub=8, d_teacher=12, num_classes=5)
    f = [torch.randn(3, 8), torch.randn(3, 8)]
    assert torch.equal(head.fuse(f), head(torch.cat(f, 1)[..., None, None]))       # 2-D and export's 4-D layout
    with pytest.raises(UsageError, match="part 1 gives 6-wide CLS features but the fusion head expects d_sub=8"):
        head.fuse([torch.randn(3, 8), torch.randn(3, 6)])
    with pytest.raises(UsageError, match="fuses 2 parts, got features from 1"):
        head.fuse([torch.randn(3, 8)])
    with pytest.raises(UsageError, match="input width 15 != 2 parts x d_sub 8 = 16"):
        build_fusion_head(num_classes=5, in_chans=15, parts=2, d_sub=8, d_teacher=12)


# --- training pipeline ------------------------------------------------------------------------------------------------
def test_train_devit_writes_parts_fusion_and_manifest(run):
    from effai.devit_runtime.parts import devit_info

    res, d = run["result"], run["dir"]
    manifest = json.loads((d / "devit.json").read_text())
    assert res["val_acc"] == manifest["val_acc"] and 0.0 <= res["val_acc"] <= 1.0
    subsets = manifest["split"]["subsets"]
    assert sorted(c for s in subsets for c in s) == list(range(10)) and manifest["split_hash"] == res["split_hash"]
    for i, part in enumerate(manifest["parts"]):
        info = devit_info(d / part["path"])
        assert info["split_hash"] == res["split_hash"] and info["part"] == i and info["classes"] == subsets[i]
        assert part["params"] < manifest["teacher"]["params"] and "rank" in part["runs_on"]
    assert manifest["traffic_bytes_per_image"] == 2 * 96 * 4 and manifest["teacher"]["d_teacher"] == 192
    with pytest.raises(UsageError, match="already holds a training run; pass --force"):
        train_devit(run["cfg"])
    bad = DevitConfig(teacher=str(run["teacher"]), parts=11, data=run["cfg"].data, out=str(run["root"] / "bad"))
    with pytest.raises(UsageError, match="more than the data's 10 classes"):
        train_devit(bad)


@pytest.fixture(scope="module")
def other_run(run, tmp_path_factory):
    """Another decomposition (split seed 7) whose sub-models start from part 0's weights, untrained."""
    other = tmp_path_factory.mktemp("devit_other") / "run"
    cfg = DevitConfig(**{**run["cfg"].to_dict(), "gammas": (0.2, 0.1, 0.3), "seed": 7, "out": str(other),
                         "epochs": 0, "finetune_epochs": 0, "ensemble_epochs": 0,
                         "student_weights": str(run["dir"] / "part_0")})
    train_devit(cfg)
    return other


def test_parts_of_another_decomposition_are_refused(run, other_run):
    from safetensors.torch import load_file

    from effai.devit_runtime.parts import load_run

    other = other_run
    init = load_file(run["dir"] / "part_0" / "model.safetensors")
    got = load_file(other / "part_1" / "model.safetensors")
    assert init.keys() == got.keys() and all(torch.equal(init[k], got[k]) for k in init)
    decomp = load_run(run["dir"])
    assert len(decomp.parts) == 2
    with pytest.raises(UsageError, match="another decomposition"):
        load_run(run["dir"], part_paths=[run["dir"] / "part_0", other / "part_1"])
    with pytest.raises(UsageError, match="is part 1, but was given as part 0"):
        load_run(run["dir"], part_paths=[run["dir"] / "part_1", run["dir"] / "part_0"])


# --- collaborative inference ------------------------------------------------------------------------------------------
def test_three_process_run_equals_the_single_process_ensemble(run):
    from effai.devit_runtime import RunSpec, load_run, run_local
    from effai.devit_runtime.inputs import load_stream

    decomp = load_run(run["dir"])
    spec = RunSpec(data="random:3", images=12, batch_size=3, warmup=1, timeout_s=30)
    result = run_local(decomp, run["dir"], spec)                 # 2 device processes + this one, gloo over TCP
    card = decomp.parts[0].card
    x = load_stream("random:3", tuple(card.input_size), list(card.mean), list(card.std), 12).x
    with torch.no_grad():
        ref = torch.cat([decomp.ensemble()(x[i:i + 3]) for i in range(0, 12, 3)])
    assert result.logits.shape == (12, 10)
    assert torch.allclose(result.logits, ref, atol=1e-6, rtol=0)
    r = result.report
    d_sub = decomp.fusion.model.d_sub
    assert r["feature_bytes_per_image"] == 2 * d_sub * 4                          # traffic: N x d_sub float32
    for dev in r["devices"]:
        assert dev["bytes_per_image"] == d_sub * 4 and dev["bytes_sent"] == (12 + 3) * d_sub * 4   # + warmup batch
        assert dev["compute_ms"]["median"] > 0
    assert r["end_to_end_ms"]["median"] > 0 and r["world_size"] == 3


def test_a_device_that_dies_mid_stream_ends_the_run_naming_it(run):
    from effai.devit_runtime import DeviceLost, RunSpec, load_run, run_local

    t0 = time.monotonic()
    with pytest.raises(DeviceLost, match=r"device rank 2 \(part 1, .*pid \d+\).*aborted"):
        run_local(load_run(run["dir"]), run["dir"], RunSpec(images=20, batch_size=2, timeout_s=60),
                  fail_after={1: 3})
    # no hang: the lost device ends the run when its stream closes, not at the timeout (which only bounds start-up
    # of the device processes: generous, a loaded 2-core host needs ~20 s to import torch in two processes)
    assert time.monotonic() - t0 < 55


def test_missing_device_and_foreign_part_are_refused_before_data_flows(run, other_run):
    from effai.devit_runtime import RunSpec, coordinate, load_part, load_run, serve

    decomp = load_run(run["dir"])
    t0 = time.monotonic()
    with pytest.raises(EffaiError, match=r"device rank 1 \(part 0\), device rank 2 \(part 1\) did not join"):
        coordinate(decomp, "127.0.0.1:0", RunSpec(timeout_s=1.0), token=TOKEN)
    assert time.monotonic() - t0 < 10
    foreign, own = load_part(other_run / "part_1"), load_part(run["dir"] / "part_0")
    errors: dict[str, BaseException] = {}

    def device(part, key):
        try:
            serve(part, f"127.0.0.1:{port['p']}", token=TOKEN, timeout_s=10)
        except BaseException as e:   # noqa: BLE001 - collected for the assertion
            errors[key] = e

    port: dict[str, int] = {}
    threads: list[threading.Thread] = []

    def listening(host, p):
        port["p"] = p
        for part, key in ((own, "own"), (foreign, "foreign")):
            threads.append(threading.Thread(target=device, args=(part, key), daemon=True))
            threads[-1].start()

    with pytest.raises(UsageError, match=r"device rank 2 \(part 1.*another decomposition"):
        coordinate(decomp, "127.0.0.1:0", RunSpec(timeout_s=10), token=TOKEN, on_listening=listening)
    for t in threads:
        t.join(15)
    assert isinstance(errors.get("foreign"), UsageError) and "refused by the coordinator" in str(errors["foreign"])


# --- export -----------------------------------------------------------------------------------------------------------
def test_devit_export_writes_every_piece_with_parity_and_where_it_runs(run, tmp_path):
    from tests.helpers import run_cli

    out = tmp_path / "bundle"        # parts quantized; the fusion head (CLS features in) stays float, noted
    code, last, _, err = run_cli("devit", "export", str(run["dir"]), "--target", "onnx", "-q", "int8-dynamic", "--out",
                                 str(out), "--json")
    assert code == 0, err
    rec = json.loads((out / "devit_bundle.json").read_text())
    assert rec["schema"] == "effai.devit-bundle/1" and rec["split_hash"] == run["result"]["split_hash"]
    assert [p["role"] for p in rec["pieces"]] == ["part", "part", "fusion"]
    assert [p["runs_on"] for p in rec["pieces"]] == ["device 0 (rank 1)", "device 1 (rank 2)", "coordinator (rank 0)"]
    assert sorted(rec["pieces"][0]["classes"] + rec["pieces"][1]["classes"]) == list(range(10))
    assert rec["traffic_bytes_per_image"] == 2 * rec["d_sub"] * 4
    assert [p["artifacts"]["onnx"]["precision"] for p in rec["pieces"]] == ["int8-dynamic", "int8-dynamic", "fp32"]
    assert "CLS features" in rec["pieces"][2]["note"]
    for piece in rec["pieces"]:
        art = piece["artifacts"]["onnx"]
        manifest = json.loads((out / art["dir"] / "manifest.json").read_text())
        assert art["parity"] == manifest["parity"]["status"] == "pass" and (out / art["file"]).is_file()
    assert manifest["parity"]["max_abs_err"] < 1e-4                       # the float fusion head matches exactly
    code, last, _, _ = run_cli("devit", "export", str(run["teacher"]), "--out", str(tmp_path / "x"), "--json")
    assert code == 2 and "fusion" in last["error"] and not (tmp_path / "x").exists()


# --- devices that fail before the process group -----------------------------------------------------------------------
def test_a_device_process_that_dies_before_the_run_fails_it_fast_naming_it(run, tmp_path):
    """run_local notices a dead device process at once (exit code + its own error line), instead of the coordinator
    waiting out --timeout for a rendezvous that cannot happen: an unreadable part checkpoint (before the device joins)
    and a crash after the coordinator's go (before the gloo process group)."""
    import shutil

    from effai.devit_runtime import RunSpec, load_run, run_local

    decomp = load_run(run["dir"])
    bad = tmp_path / "run"
    shutil.copytree(run["dir"], bad)
    (bad / "part_1" / "model.safetensors").write_bytes(b"not a checkpoint")   # what device 1 reads, not the coordinator
    t0 = time.monotonic()
    with pytest.raises(EffaiError, match=r"^device rank 2 \(part 1, pid \d+\) exited with code 2 before joining the "
                                         r"run: \S+part_1/model.safetensors: cannot read its metadata") as e:
        run_local(decomp, bad, RunSpec(images=4, timeout_s=60))
    assert time.monotonic() - t0 < 30 and "{" not in str(e.value)              # the error line, not the JSON object
    t0 = time.monotonic()
    with pytest.raises(EffaiError, match=r"^device rank 1 \(part 0, pid \d+\) exited with code 17 before joining"):
        run_local(decomp, run["dir"], RunSpec(images=4, timeout_s=60), fail_after={0: 0})   # dies after the go
    assert time.monotonic() - t0 < 30


def test_a_device_that_cannot_load_its_inputs_is_named_and_the_others_are_told(run, monkeypatch):
    """A device's own error after the go (here: its --data fails to load) reaches the coordinator through the
    rendezvous, naming the device, and the device that was ready is told the run was aborted; nobody times out."""
    from effai.devit_runtime import RunSpec, coordinate, load_run, serve
    from effai.devit_runtime import device as device_module

    decomp = load_run(run["dir"])
    real = device_module.load_stream

    def load_stream(*args, **kwargs):
        if threading.current_thread().name == "part 1":
            raise UsageError("--data digits: no such file or directory; give 'digits', an image folder or an .npz")
        return real(*args, **kwargs)

    monkeypatch.setattr(device_module, "load_stream", load_stream)
    errors: dict[int, BaseException] = {}
    threads: list[threading.Thread] = []

    def device(part, port):
        try:
            serve(part, f"127.0.0.1:{port}", token=TOKEN, timeout_s=60)
        except BaseException as e:   # noqa: BLE001 - collected for the assertion
            errors[part.index] = e

    def listening(host, port):
        for part in decomp.parts:
            threads.append(threading.Thread(target=device, args=(part, port), name=f"part {part.index}", daemon=True))
            threads[-1].start()

    t0 = time.monotonic()
    with pytest.raises(UsageError, match=r"^device rank 2 \(part 1, .*\) failed before joining the run: --data digits:"
                                         r" no such file"):
        coordinate(decomp, "127.0.0.1:0", RunSpec(images=4, timeout_s=60), token=TOKEN, on_listening=listening)
    for t in threads:
        t.join(30)
    assert time.monotonic() - t0 < 30
    assert isinstance(errors[1], UsageError) and "no such file" in str(errors[1])
    assert isinstance(errors[0], EffaiError) and "aborted by the coordinator" in str(errors[0]) \
        and "device rank 2 (part 1" in str(errors[0])


# --- the ready/start handshake: who is told what, on whose clock ------------------------------------------------------
def _client(port: int, timeout_s: float = 10.0, token: str = TOKEN):
    from effai.devit_runtime import channel

    return channel.connect("127.0.0.1", port, token, timeout_s)


def _fake_device(port: int, part, got: dict, protocol: bool = True, ready: bool = True, join: bool = True,
                 on_verdict=None) -> None:
    """A device that speaks the rendezvous by hand (the coordinator's random images, no gloo); what it reads goes
    into `got`."""
    from effai.devit_runtime.inputs import load_stream
    from effai.devit_runtime.messages import KEY, device_info, stream_digest

    try:
        store, rank = _client(port), part.index + 1
        info = device_info(part)
        if not protocol:
            info.pop("protocol")                                  # what a device of the previous release publishes
        store.add(f"{KEY}/claim/{rank}", 1)
        store.set(f"{KEY}/device/{rank}", json.dumps(info))
        got["verdict"] = json.loads(store.get(f"{KEY}/verdict/{rank}"))
        store.add(f"{KEY}/ack", 1)
        if on_verdict is not None:
            on_verdict()
        if not got["verdict"]["ok"] or not ready:
            return
        spec, card = got["verdict"]["spec"], part.card
        stream = load_stream(spec["data"], tuple(card.input_size), list(card.mean), list(card.std), spec["images"])
        store.set(f"{KEY}/ready/{rank}", json.dumps({"ok": True, "data": spec["data"],
                                                     "stream": stream_digest(stream)}))
        got["start"] = json.loads(store.get(f"{KEY}/start"))
        store.add(f"{KEY}/start_ack", 1)
        if join and got["start"]["ok"]:
            store.set(f"{KEY}/joining/{rank}", "1")
    except BaseException as e:   # noqa: BLE001 - collected for the assertion
        got["error"] = e


def _coordinate(decomp, spec, devices, watch=None) -> BaseException | None:
    """Run coordinate() with `devices(port)` started once it listens; return its error. The coordinator's store is
    closed on return (its frames are collected), as when `effai devit run` exits."""
    import gc

    from effai.devit_runtime import coordinate

    threads: list[threading.Thread] = []

    def listening(host, port):
        for target, name in devices(port):
            threads.append(threading.Thread(target=target, name=name, daemon=True))
            threads[-1].start()

    error = None
    try:
        coordinate(decomp, "127.0.0.1:0", spec, token=TOKEN, on_listening=listening, watch=watch)
    except BaseException as e:   # noqa: BLE001 - returned for the assertion
        error = chained = e
        while chained is not None:   # drop its frames (the coordinator's store with them), as a process exit would
            chained.__traceback__ = None
            chained = chained.__cause__ or chained.__context__
    gc.collect()
    for t in threads:
        t.join(20)
    return error


def test_when_rank_1_fails_the_ready_rank_2_is_told_why(run, monkeypatch):
    """Part 0 (rank 1, checked first) fails to load its inputs only once part 1 has reported ready, and part 1 is
    slow to read the verdict: the coordinator must wait for part 1's ack (ready devices counted from the store), so
    part 1 gets the real reason, not a closed socket. A non-effai exception on the device becomes its one-line
    EffaiError (so `serve --json` prints its JSON line)."""
    from effai.devit_runtime import RunSpec, channel, load_run, serve
    from effai.devit_runtime import device as device_module
    from effai.devit_runtime.messages import KEY

    decomp = load_run(run["dir"])
    real, port = device_module.load_stream, {}

    class SlowToReadStart(channel.RemoteStore):
        def get(self, key):
            if key.endswith("/start") and threading.current_thread().name == "part 1":
                time.sleep(0.5)
            return super().get(key)

    monkeypatch.setattr(channel, "RemoteStore", SlowToReadStart)

    def load_stream(*args, **kwargs):
        if threading.current_thread().name == "part 0":
            _client(port["p"]).wait([f"{KEY}/ready/2"])   # part 1 is ready and waiting for start
            raise RuntimeError("boom while reading inputs")
        return real(*args, **kwargs)

    monkeypatch.setattr(device_module, "load_stream", load_stream)
    errors: dict[int, BaseException] = {}

    def device(part, p):
        try:
            serve(part, f"127.0.0.1:{p}", token=TOKEN, timeout_s=20)
        except BaseException as e:   # noqa: BLE001 - collected for the assertion
            errors[part.index] = e

    def devices(p):
        port["p"] = p
        return [(lambda part=part: device(part, p), f"part {part.index}") for part in decomp.parts]

    t0 = time.monotonic()
    error = _coordinate(decomp, RunSpec(images=4, timeout_s=20), devices)
    assert time.monotonic() - t0 < 15
    reason = r"device rank 1 \(part 0, .*\) failed before joining the run: loading its inputs \(random\) failed: " \
             r"RuntimeError: boom while reading inputs"
    assert type(error) is EffaiError and re.match("^" + reason + "$", str(error)), error
    assert type(errors[0]) is EffaiError and isinstance(errors[0].__cause__, RuntimeError)
    assert str(errors[0]) == "loading its inputs (random) failed: RuntimeError: boom while reading inputs"
    assert re.match(r"^the run was aborted by the coordinator at 127\.0\.0\.1:\d+: " + reason, str(errors[1])), \
        errors[1]


def test_mixed_protocol_versions_are_refused_on_both_sides(run, monkeypatch):
    """A device of an older release (no protocol in its info) is refused by name, and both devices are told why; a
    device facing an older coordinator (torch's TCPStore rendezvous), or a coordinator facing a device that greets
    with another protocol, refuses at the handshake. Each says: install the same effai."""
    import datetime
    import socket

    import torch.distributed as dist

    from effai.devit_runtime import RunSpec, channel, load_run, serve
    from effai.devit_runtime.messages import PROTOCOL

    decomp = load_run(run["dir"])
    got: list[dict] = [{}, {}]
    error = _coordinate(decomp, RunSpec(timeout_s=10), lambda p: [
        (lambda: _fake_device(p, decomp.parts[0], got[0]), "part 0"),
        (lambda: _fake_device(p, decomp.parts[1], got[1], protocol=False), "part 1")])
    want = rf"device rank 2 \(part 1, .*\) runs effai devit protocol 1, the coordinator {PROTOCOL}: install the same " \
           r"effai on every device"
    assert type(error) is UsageError and re.match("^" + want + "$", str(error)), error
    for g in got:
        assert "error" not in g and not g["verdict"]["ok"] and g["verdict"]["usage"]
        assert re.search(want, g["verdict"]["error"])                              # both devices are told why
    monkeypatch.setattr(channel, "HANDSHAKE_S", 1.0)
    old = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10),
                        wait_for_workers=False)                                    # a coordinator of protocol 2
    with pytest.raises(EffaiError, match=rf"^the service at 127\.0\.0\.1:{old.port} did not answer as an effai devit "
                                         rf"coordinator \(protocol {PROTOCOL}\); it runs an older effai \(install the "
                                         "same effai on every device\)"):
        serve(decomp.parts[0], f"127.0.0.1:{old.port}", token=TOKEN, timeout_s=10)
    rv = channel.Rendezvous("127.0.0.1", 0, TOKEN)
    try:
        with socket.create_connection(("127.0.0.1", rv.port), timeout=5) as s:   # a device of protocol 2 greeting
            s.sendall(channel._HELLO.pack(channel.MAGIC, 2, bytes(32)))
            magic, theirs, status, _ = channel._REPLY.unpack(channel._read(s, channel._REPLY.size))
        assert (magic, theirs, status) == (channel.MAGIC, PROTOCOL, channel.WRONG_PROTOCOL)
        assert rv.refused == [f"127.0.0.1 (effai devit protocol 2, this coordinator {PROTOCOL})"]
        assert rv.store.num_keys() == 0
    finally:
        rv.close()


def test_a_ready_device_waits_for_start_on_the_coordinators_clock(run):
    """A device started with a shorter --timeout than the coordinator's still waits for start as long as the
    coordinator may take (its timeout_s, given in the go); a coordinator that ends the run meanwhile is reported as
    such at once, not as a timeout."""
    import dataclasses

    from effai.devit_runtime import RunSpec, channel, load_run, serve
    from effai.devit_runtime.messages import KEY, PROTOCOL

    part = load_run(run["dir"]).parts[0]
    go = {"ok": True, "protocol": PROTOCOL, "spec": dataclasses.asdict(RunSpec(images=4, timeout_s=10)),
          "val_seed": 0, "val_fraction": 0.2, "error": None, "usage": False}

    def until_ready(rv) -> tuple[threading.Thread, dict]:
        errors: dict[str, BaseException] = {}
        address = f"127.0.0.1:{rv.port}"

        def device():
            try:
                serve(part, address, token=TOKEN, timeout_s=0.5)          # its own --timeout: 0.5 s
            except BaseException as e:   # noqa: BLE001 - collected for the assertion
                errors["e"] = e

        t = threading.Thread(target=device, daemon=True)
        t.start()
        rv.store.get(f"{KEY}/device/1", 10)
        rv.store.set(f"{KEY}/verdict/1", json.dumps(go))
        rv.store.wait([f"{KEY}/ready/1"])
        return t, errors

    rv = channel.Rendezvous("127.0.0.1", 0, TOKEN)
    t, errors = until_ready(rv)
    time.sleep(1.5)                                                # 3x the device's own timeout
    assert t.is_alive()
    rv.store.set(f"{KEY}/start", json.dumps({"ok": False, "error": "the run was aborted by the test"}))
    t.join(10)
    assert type(errors.get("e")) is EffaiError and str(errors["e"]) == "the run was aborted by the test"
    assert rv.store.add(f"{KEY}/start_ack", 0) == 1
    rv.close()

    rv = channel.Rendezvous("127.0.0.1", 0, TOKEN)
    address = f"127.0.0.1:{rv.port}"
    t, errors = until_ready(rv)
    t0 = time.monotonic()
    rv.close()                                                     # the coordinator's process exits
    t.join(10)
    assert time.monotonic() - t0 < 5
    assert re.match(rf"^the coordinator at {re.escape(address)} ended the run \(.*\); its own output says why$",
                    str(errors.get("e"))), errors.get("e")


def test_a_device_that_reports_ready_then_never_joins_is_named(run):
    """A device that dies between ready and the process group is named from its missing `joining` key, not left
    as an anonymous gloo timeout; with a `watch` (run_local) its process's own exit notice wins."""
    from effai.devit_runtime import RunSpec, load_run
    from effai.devit_runtime.network import DeviceExited

    decomp = load_run(run["dir"])
    spec = RunSpec(images=4, timeout_s=1.5)
    got: list[dict] = [{}, {}]
    t0 = time.monotonic()
    error = _coordinate(decomp, spec, lambda p: [
        (lambda: _fake_device(p, decomp.parts[0], got[0]), "part 0"),
        (lambda: _fake_device(p, decomp.parts[1], got[1], join=False), "part 1")])    # ready, then gone
    assert time.monotonic() - t0 < 10
    assert type(error) is EffaiError and re.match(
        r"^device rank 2 \(part 1, .*\) reported ready, then never joined the process group within 1\.5s "
        r"\(crashed\?\)", str(error)), error
    assert got[0]["start"]["ok"] and got[1]["start"]["ok"]
    started = threading.Event()
    exited = DeviceExited("device rank 2 (part 1, pid 1) exited with code 9 before joining the run: (no output)", 2)

    def watch():
        if started.is_set():
            raise exited

    def devices(p):
        def dies_after_start():
            _fake_device(p, decomp.parts[1], got[1])
            started.set()

        return [(lambda: _fake_device(p, decomp.parts[0], got[0]), "part 0"), (dies_after_start, "part 1")]

    assert _coordinate(decomp, spec, devices, watch=watch) is exited


def test_a_device_s_own_report_wins_over_its_exit_notice(run):
    """A local device writes its UsageError to the store and exits; when `watch` sees the exit first, the coordinator
    re-reads the reports and raises the device's own UsageError (exit code 2), and the ready device is told why."""
    from effai.devit_runtime import RunSpec, load_run
    from effai.devit_runtime.messages import KEY
    from effai.devit_runtime.network import DeviceExited

    decomp = load_run(run["dir"])
    seen, port = threading.Event(), {}
    got: list[dict] = [{}, {}]

    def watch():   # between the coordinator's read of the reports and this check, device 2 reports and exits
        if seen.is_set():
            device = _client(port["p"])
            report = {"ok": False, "usage": True, "error": "--data nowhere: no such file"}
            device.set(f"{KEY}/ready/2", json.dumps(report))
            device.check([f"{KEY}/ready/2"])                         # (a round trip: the report has landed)
            raise DeviceExited("device rank 2 (part 1, pid 1) exited with code 2 before joining the run", 2)

    def devices(p):
        port["p"] = p
        return [(lambda: _fake_device(p, decomp.parts[0], got[0]), "part 0"),
                (lambda: _fake_device(p, decomp.parts[1], got[1], ready=False, on_verdict=seen.set), "part 1")]

    t0 = time.monotonic()
    error = _coordinate(decomp, RunSpec(images=4, timeout_s=10), devices, watch=watch)
    assert time.monotonic() - t0 < 5                               # device 1 acked at once: no 3 s wait
    assert type(error) is UsageError and re.match(
        r"^device rank 2 \(part 1, .*\) failed before joining the run: --data nowhere: no such file$", str(error))
    assert not got[0]["start"]["ok"] and "--data nowhere" in got[0]["start"]["error"]


# --- who may join, what is exposed (issue 21.2) -----------------------------------------------------------------------
def _listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket this process listens on, from /proc/self/fd and /proc/net/tcp{,6}."""
    import ipaddress
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] != "0A" or f[9] not in inodes:                        # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # little-endian 32-bit words
            out.add((str(ipaddress.ip_address(raw)), int(hexport, 16)))
    return out


def _devices_in_threads(decomp, token=TOKEN, data=(None, None), parts=None, timeout_s=20):
    """`devices(port)` for _coordinate: real serve() calls in threads; their errors go into the returned dict."""
    from effai.devit_runtime import serve

    errors: dict[int, BaseException] = {}

    def device(part, i, p):
        try:
            serve(part, f"127.0.0.1:{p}", token=token, timeout_s=timeout_s, data=data[i])
        except BaseException as e:   # noqa: BLE001 - collected for the assertion
            errors[i] = e

    def devices(p):
        return [(lambda part=part, i=i: device(part, i, p), f"part {i}")
                for i, part in enumerate(parts or decomp.parts)]

    return devices, errors


@pytest.mark.skipif(not __import__("os").path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_run_listens_only_on_the_given_address(run, digits_npz, host, monkeypatch):
    """Every socket the run listens on (the rendezvous, and gloo's of the coordinator and both devices: here all in
    this process) is bound to exactly the given address, not every interface as torch's TCPStore did. The devices
    read the held-out digits from their own --data; the result is the ensemble's."""
    import socket

    from effai.devit_runtime import RunSpec, coordinate, load_run, serve
    from effai.devit_runtime import coordinator as coordinator_module
    from effai.devit_runtime.inputs import load_stream
    from effai.devit_runtime.network import format_address

    if host == "::1":
        try:
            socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        except OSError:
            pytest.skip("no IPv6 loopback here")
    decomp = load_run(run["dir"])
    before, during = _listening_sockets(), {}
    real_loop = coordinator_module._coordinator_loop

    def loop(*args, **kwargs):   # every process has joined gloo: all listeners exist
        during["sockets"] = _listening_sockets() - before
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(coordinator_module, "_coordinator_loop", loop)
    data = "random:5" if host == "::1" else str(digits_npz)
    errors: dict[int, BaseException] = {}
    threads: list[threading.Thread] = []

    def device(part, port):
        try:
            serve(part, format_address(host, port), token=TOKEN, timeout_s=20, data=data)
        except BaseException as e:   # noqa: BLE001 - collected for the assertion
            errors[part.index] = e

    def listening(h, port):
        for part in decomp.parts:
            threads.append(threading.Thread(target=device, args=(part, port), daemon=True))
            threads[-1].start()

    spec = RunSpec(data=data, images=6, batch_size=3, warmup=1, timeout_s=20)
    result = coordinate(decomp, format_address(host, 0), spec, token=TOKEN, on_listening=listening)
    for t in threads:
        t.join(20)
    assert not errors, errors
    listeners = during["sockets"]
    assert len(listeners) >= 4, listeners                        # rendezvous + gloo of the coordinator and 2 devices
    assert {addr for addr, _ in listeners} == {host}, listeners
    stream = load_stream(data, tuple(decomp.parts[0].card.input_size), list(decomp.parts[0].card.mean),
                                 list(decomp.parts[0].card.std), 6, decomp.manifest["dataset"]["val_seed"],
                                 decomp.manifest["dataset"]["val_fraction"])
    with torch.no_grad():
        ref = torch.cat([decomp.ensemble()(stream.x[i:i + 3]) for i in (0, 3)])
    assert torch.allclose(result.logits, ref, atol=1e-6, rtol=0)
    assert ("accuracy" in result.report) == (host != "::1")


def test_a_peer_without_the_token_cannot_join_read_or_write(run, monkeypatch):
    """torch's TCPStore client (what anyone could use against the old rendezvous to claim a rank, publish a fake
    ready, or read the devices' info) gets nowhere; a device with the wrong token is refused and told so; the
    coordinator's error lists who was refused. Nothing of theirs reaches the store."""
    import datetime

    import torch.distributed as dist

    from effai.devit_runtime import RunSpec, channel, load_run
    from effai.devit_runtime.messages import KEY

    monkeypatch.setattr(channel, "HANDSHAKE_S", 1.0)             # the TCPStore client waits out the handshake
    decomp = load_run(run["dir"])
    got: dict[str, object] = {}
    stores = []

    def intruder(p):
        try:
            s = dist.TCPStore("127.0.0.1", p, is_master=False, timeout=datetime.timedelta(seconds=1))
            got["claim"] = s.add(f"{KEY}/claim/1", 1)
            s.set(f"{KEY}/ready/1", json.dumps({"ok": False, "error": "\x1b[2Jinjected"}))
            got["keys"] = s.num_keys()
        except BaseException as e:   # noqa: BLE001 - collected for the assertion
            got["tcpstore"] = e

    def wrong_token(p):
        try:
            stores.append(_client(p, token="not-the-run-token-0123456789"))
        except BaseException as e:   # noqa: BLE001 - collected for the assertion
            got["client"] = e

    devices, errors = _devices_in_threads(decomp, token="another-token-abcdefghijklmn", parts=decomp.parts[:1])
    error = _coordinate(decomp, RunSpec(timeout_s=3), lambda p: [(lambda: intruder(p), "intruder"),
                                                                 (lambda: wrong_token(p), "client"), *devices(p)])
    assert "claim" not in got and isinstance(got.get("tcpstore"), dist.DistError), got
    assert isinstance(got.get("client"), UsageError) and "refused this device's token" in str(got["client"])
    assert isinstance(errors.get(0), UsageError) and re.match(
        r"^the coordinator at 127\.0\.0\.1:\d+ refused this device's token: give every device the token file of "
        r"this run \(--token-file\) or \$EFFAI_DEVIT_TOKEN$", str(errors[0])), errors
    assert type(error) is EffaiError and re.match(
        r"^device rank 1 \(part 0\), device rank 2 \(part 1\) did not join .*; refused: .*127\.0\.0\.1 "
        r"\(wrong token\), 127\.0\.0\.1 \(wrong token\)", str(error)), error
    assert "127.0.0.1 (it did not speak the effai devit protocol)" in str(error)


def test_a_coordinator_without_the_token_is_refused_by_the_device(run):
    """A listener that answers the greeting but cannot prove the token (a stranger at the address, or one relaying
    without it) gets no device info: the device stops at the handshake."""
    import secrets
    import socket

    from effai.devit_runtime import channel, load_part, serve

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen: dict[str, bytes] = {}

    def fake():
        conn, _ = server.accept()
        with conn:
            seen["hello"] = channel._read(conn, channel._HELLO.size)
            conn.sendall(channel._REPLY.pack(channel.MAGIC, channel.PROTOCOL, channel.OK, secrets.token_bytes(32)))
            seen["proof"] = channel._read(conn, 32)
            conn.sendall(bytes([channel.OK]) + secrets.token_bytes(32))    # a proof it cannot make
            conn.settimeout(2)
            try:
                seen["after"] = conn.recv(65536)
            except OSError:
                seen["after"] = b""

    t = threading.Thread(target=fake, daemon=True)
    t.start()
    with pytest.raises(EffaiError, match=rf"^the service at 127\.0\.0\.1:{port} does not hold this run's token: it is "
                                         "not this run's coordinator; check the address$"):
        serve(load_part(run["dir"] / "part_0"), f"127.0.0.1:{port}", token=TOKEN, timeout_s=5)
    t.join(5)
    server.close()
    assert seen["after"] == b""                                    # the device sent nothing more, and hung up
    assert TOKEN.encode() not in seen["hello"] + seen["proof"]


def test_frames_are_encrypted_and_a_tampered_one_is_refused():
    import socket

    from effai.devit_runtime import channel

    a, b = socket.socketpair()
    key = bytes(range(32))
    sender, receiver = channel._Session(a, key, side=0), channel._Session(b, key, side=1)
    sender.send({"host": "secret-host", "path": "/home/me/part_0"})
    frame = b.recv(65536)
    assert b"secret-host" not in frame and b"/home/me" not in frame
    a.sendall(frame + frame)                                       # delivered, then the same frame: a replay
    assert receiver.recv() == {"host": "secret-host", "path": "/home/me/part_0"}
    with pytest.raises(channel.ChannelClosed, match="authentication"):
        receiver.recv()
    a2, b2 = socket.socketpair()
    sender, receiver = channel._Session(a2, key, side=0), channel._Session(b2, key, side=1)
    sender.send({"ok": True})
    frame = bytearray(b2.recv(65536))
    frame[-1] ^= 1
    a2.sendall(bytes(frame))
    with pytest.raises(channel.ChannelClosed, match="authentication"):
        receiver.recv()
    for s in (a, b, a2, b2):
        s.close()


def test_a_part_with_other_weights_is_refused_by_its_hash(run, tmp_path):
    """devit.json records each part's sha256; a device serving a file with the right metadata but zeroed weights
    is refused naming the part (and told why), and a coordinator whose own part file differs from the record
    refuses to load the run."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from effai.devit_runtime import RunSpec, load_part, load_run
    from effai.files import sha256

    manifest = json.loads((run["dir"] / "devit.json").read_text())
    for i, rec in enumerate(manifest["parts"]):
        assert rec["sha256"] == sha256(run["dir"] / f"part_{i}" / "model.safetensors")
    assert manifest["fusion"]["sha256"] == sha256(run["dir"] / "fusion" / "model.safetensors")
    src = run["dir"] / "part_0" / "model.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        zeroed = {k: torch.zeros_like(f.get_tensor(k)) for k in f.keys()}
    fake = tmp_path / "part_0" / "model.safetensors"
    fake.parent.mkdir()
    save_file(zeroed, str(fake), metadata=meta)
    decomp = load_run(run["dir"])
    devices, errors = _devices_in_threads(decomp, parts=[load_part(fake), decomp.parts[1]])
    error = _coordinate(decomp, RunSpec(images=4, timeout_s=10), devices)
    want = (r"device rank 1 \(part 0, .*\) serves \S+/part_0/model.safetensors, whose weights are not part 0 of "
            r"this run \(sha256 [0-9a-f]{12}…, the run's [0-9a-f]{12}…\); copy the run's part_0/model.safetensors to "
            r"that device")
    assert type(error) is UsageError and re.match("^" + want + "$", str(error)), error
    assert isinstance(errors.get(0), UsageError) and re.search(want, str(errors[0]))
    copy = tmp_path / "run"
    shutil.copytree(run["dir"], copy)
    shutil.copy(fake, copy / "part_0" / "model.safetensors")
    with pytest.raises(UsageError, match=r"part_0/model.safetensors is not the part 0 that \S+devit.json records"):
        load_run(copy)


def _verdict_to(part, verdict: dict, data=None) -> tuple[BaseException | None, dict | None, list]:
    """serve(part) against a hand-made coordinator that sends `verdict`: (the device's error, what it reported as
    ready, the load_stream calls it made)."""
    from effai.devit_runtime import channel, serve
    from effai.devit_runtime import device as device_module
    from effai.devit_runtime.messages import KEY

    calls: list = []
    real = device_module.load_stream
    rv = channel.Rendezvous("127.0.0.1", 0, TOKEN)
    errors: dict[str, BaseException] = {}

    def device():
        try:
            serve(part, f"127.0.0.1:{rv.port}", token=TOKEN, timeout_s=5, data=data)
        except BaseException as e:   # noqa: BLE001 - collected for the assertion
            errors["e"] = e

    def recording(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    device_module.load_stream = recording
    try:
        t = threading.Thread(target=device, daemon=True)
        t.start()
        rv.store.get(f"{KEY}/device/1", 10)
        rv.store.set(f"{KEY}/verdict/1", json.dumps(verdict))
        ready, key, deadline = None, f"{KEY}/ready/1", time.monotonic() + 10
        while t.is_alive() and not rv.store.check([key]) and time.monotonic() < deadline:
            time.sleep(0.02)
        if rv.store.check([key]):
            ready = json.loads(rv.store.get(key))
            rv.store.set(f"{KEY}/start", json.dumps({"ok": False, "error": "test over"}))
        t.join(10)
    finally:
        device_module.load_stream = real
        rv.close()
    return errors.get("e"), ready, calls


def test_a_coordinator_s_spec_is_checked_strictly_and_never_names_the_device_s_files(run, digits_npz):
    """An unknown field or a wrong type in the coordinator's spec is a clear UsageError (an unknown key crashed the
    device with a TypeError); a data set path the coordinator names is never opened, and the device's answer is the
    same whether that path exists or not. A device's own --data is what it reads."""
    import dataclasses

    from effai.devit_runtime import RunSpec, load_run
    from effai.devit_runtime.messages import PROTOCOL

    part = load_run(run["dir"]).parts[0]

    def verdict(**spec):
        return {"ok": True, "protocol": PROTOCOL, "val_seed": 0, "val_fraction": 0.2, "error": None, "usage": False,
                "spec": {**dataclasses.asdict(RunSpec(images=4, timeout_s=5)), **spec}}

    error, ready, _ = _verdict_to(part, verdict(evil=1))
    assert type(error) is UsageError and re.match(r"^the coordinator at 127\.0\.0\.1:\d+ sent a run spec that has "
                                                  r"unknown field\(s\) evil; install the same effai on every device$",
                                                  str(error)), error
    error, _, _ = _verdict_to(part, verdict(images="64"))
    assert type(error) is UsageError and "has images of the wrong type (str, not int)" in str(error)
    error, _, _ = _verdict_to(part, {**verdict(), "extra": True})
    assert type(error) is UsageError and "has unknown field(s) extra" in str(error)
    answers = []
    for path in (str(digits_npz), "/nonexistent/secret.npz"):
        error, ready, calls = _verdict_to(part, verdict(data=path))
        assert calls == [] and ready is not None and not ready["ok"] and ready["usage"]
        assert type(error) is UsageError and "start it with --data" in str(error)
        answers.append(re.sub(r":\d+ ", ":PORT ", f"{error} | {ready['error']}").replace(path, "PATH"))
    assert answers[0] == answers[1]                               # no oracle on the device's files
    error, ready, calls = _verdict_to(part, verdict(data="/nonexistent/secret.npz"), data=str(digits_npz))
    assert calls == [str(digits_npz)] and ready["ok"] and ready["data"] == str(digits_npz)
    assert error is not None and "test over" in str(error)


def test_a_device_that_reads_other_images_is_refused(run):
    """The coordinator compares each device's stream hash with its own: a device started with another --data
    cannot feed the fusion head features of other images."""
    from effai.devit_runtime import RunSpec, load_run

    decomp = load_run(run["dir"])
    devices, errors = _devices_in_threads(decomp, data=("random:1", "random:2"))
    error = _coordinate(decomp, RunSpec(data="random:1", images=4, timeout_s=10), devices)
    assert type(error) is UsageError and re.match(
        r"^device rank 2 \(part 1, .*\) reads other images \(its --data random:2\) than the coordinator \(--data "
        r"random:1\); start every device with --data", str(error)), error
    assert "reads other images" in str(errors.get(0)) and "aborted by the coordinator" in str(errors.get(0))


def test_token_options(run, tmp_path, monkeypatch):
    """`run` without a token refuses a networked run; --token-file is created (0600, a fresh token) when missing;
    a token file others can read, or a short token, is refused; serve needs a token too."""
    import os
    import stat

    import typer

    from effai import console
    from effai.cli.devit import run_cmd, serve_cmd
    from effai.devit_runtime import channel

    monkeypatch.delenv(channel.TOKEN_ENV, raising=False)
    lines: list[dict] = []
    monkeypatch.setattr(console, "json_line", lines.append)
    with pytest.raises(typer.Exit) as e:
        run_cmd(run["dir"], coordinator="127.0.0.1:0", local=False, data="random", images=4, batch_size=1, warmup=0,
                send_images=False, timeout=1.0, token_file=None, threads=1, out=None, as_json=True)
    assert e.value.exit_code == 2 and "needs a shared token: pass --token-file FILE" in lines[-1]["error"]
    with pytest.raises(typer.Exit) as e:
        serve_cmd(run["dir"], part=0, coordinator="127.0.0.1:1", timeout=1.0, token_file=None, data=None, threads=None,
                  fail_after=None, as_json=True)
    assert e.value.exit_code == 2 and "needs the run's token" in lines[-1]["error"]
    path = tmp_path / "devit.token"
    token, created = channel.resolve_token(path, create=True)
    assert created and stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(token) >= 40
    assert channel.resolve_token(path, create=True) == (token, False)
    os.chmod(path, 0o644)
    with pytest.raises(UsageError, match=r"can be read by other users \(mode 644\); run chmod 600"):
        channel.resolve_token(path)
    monkeypatch.setenv(channel.TOKEN_ENV, "short")
    with pytest.raises(UsageError, match=r"\$EFFAI_DEVIT_TOKEN holds no usable token"):
        channel.resolve_token(None)


def test_devit_defaults_are_the_references_and_mixing_is_seeded_and_label_consistent():
    """Reference defaults (mixup 0.8, cutmix 1.0, relation mode 'reference', fresh sub-teacher heads); a mixed
    batch's soft targets are a convex mix of smoothed one-hots whose weight is the share of pixels (cutmix) or the
    blend factor (mixup); the same generator seed gives the same batch."""
    import torch

    from effai.errors import UsageError
    from effai.train.devit.config import DevitConfig
    from effai.train.mixing import mix_batch

    cfg = DevitConfig(teacher="x")
    assert (cfg.mixup, cfg.cutmix, cfg.relation_mode, cfg.sub_teacher_head) == (0.8, 1.0, "reference", "fresh")
    with pytest.raises(UsageError, match="relation mode 'nope'"):
        DevitConfig(teacher="x", relation_mode="nope")
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])            # image 0 all 0, image 1 all 1
    y = torch.tensor([0, 1])
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        a = mix_batch(x, y, 3, mixup=mixup, cutmix=cutmix, smoothing=0.1, g=torch.Generator().manual_seed(3))
        b = mix_batch(x, y, 3, mixup=mixup, cutmix=cutmix, smoothing=0.1, g=torch.Generator().manual_seed(3))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        xm, t = a
        assert torch.allclose(t.sum(1), torch.ones(2)) and float(t[:, 2].max()) == pytest.approx(0.1 / 3)
        share_of_1 = float(xm[0].mean())        # image 0's pixels that now come from image 1 (or its blend weight)
        on, off = 1 - 0.1 + 0.1 / 3, 0.1 / 3
        assert float(t[0, 1]) == pytest.approx(off + (on - off) * share_of_1, abs=1e-6)


def test_epochs_bounds_every_devit_stage_unless_the_stages_own_option_is_given():
    from effai.cli.train import bound_stage_epochs
    from effai.train.devit.config import DevitConfig

    cfg = DevitConfig(teacher="x", **bound_stage_epochs(DevitConfig, {"epochs": 1}, {}))
    assert (cfg.epochs, cfg.finetune_epochs, cfg.ensemble_epochs, cfg.prune_epochs) == (1, 1, 1, 1)
    opts = bound_stage_epochs(DevitConfig, {"epochs": 2}, {"ensemble_epochs": 7})
    cfg = DevitConfig(teacher="x", **opts, ensemble_epochs=7)
    assert (cfg.epochs, cfg.finetune_epochs, cfg.ensemble_epochs) == (2, 2, 7)
    assert bound_stage_epochs(DevitConfig, {}, {}) == {}
