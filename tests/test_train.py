"""Training: data sources, recipes, the loop (resume, divergence), DDP on 2 CPU processes, and export of the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from effai import zoo
from effai.errors import UsageError
from effai.data import datasets as data_mod
from effai.train.loop import TrainingDiverged, train
from effai.train.recipes import make_config
from tests.helpers import run_cli

TINY = dict(student="resnet10t", channels=1, input_size=32, batch_size=32, epochs=3, warmup_epochs=1)


def test_digits_load_and_stratified_seeded_split():
    d = data_mod.load("digits", 64, 1)
    assert d.x.shape == (1797, 1, 64, 64) and d.x.dtype == torch.uint8 and len(d.classes) == 10
    tr, va = data_mod.split(d, 0.2, seed=0)
    tr2, va2 = data_mod.split(d, 0.2, seed=0)
    assert torch.equal(va.y, va2.y) and len(tr) + len(va) == 1797
    counts = torch.bincount(va.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_image_folder_and_its_errors(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    d = data_mod.load(str(root), 16, 3)
    assert d.x.shape == (6, 3, 16, 16) and d.classes == ["cat", "dog"] and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(UsageError, match="no images found"):
        data_mod.load(str(empty), 16, 3)
    one = tmp_path / "one"
    (one / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / "a" / "x.png")
    with pytest.raises(UsageError, match="at least 2"):
        data_mod.load(str(one), 16, 3)
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="cannot read image"):
        data_mod.load(str(root), 16, 3)


def test_recipe_and_option_errors():
    with pytest.raises(UsageError, match="unknown recipe 'ghostnet'.*ghostnetv3"):
        make_config("ghostnet")
    with pytest.raises(UsageError, match="needs --teacher"):
        make_config("kd", student="resnet10t")
    with pytest.raises(UsageError, match="--data nowhere"):
        train(make_config("supervised", data="nowhere", **TINY))
    from effai.train.losses import LOSSES

    with pytest.raises(UsageError, match="did you mean 'dkd'"):
        LOSSES.get("dkdd")
    cfg = make_config("ghostnetv3")
    assert (cfg.lr, cfg.weight_decay, cfg.label_smoothing, cfg.momentum) == (0.05, 2e-5, 0.1, 0.9)
    assert cfg.loss == "kd" and cfg.channels == 1 and cfg.hflip is False


def test_unwritable_output_dir(tmp_path, digits_npz):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="cannot write to --out"):
        train(make_config("supervised", data=str(digits_npz), out=str(f / "run"), **TINY))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits_npz):
    out = tmp_path_factory.mktemp("runs") / "full"
    return out, train(make_config("supervised", data=str(digits_npz), out=str(out), **TINY))


def test_training_writes_metrics_checkpoint_and_a_model_export_takes(tiny_run, tmp_path):
    out, result = tiny_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert {"lr", "train_acc", "val_acc", "val_acc_ema", "images_per_s"} <= set(rows[0])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    loaded = zoo.create(weights=out / "model.safetensors")          # no model name: the card is in the metadata
    assert loaded.card.num_classes == 10 and loaded.card.input_size == (1, 32, 32) and not loaded.random_init
    assert zoo.labels(loaded.card) == [str(i) for i in range(10)]
    from effai.export.pipeline import ExportConfig, export

    res = export(loaded, ExportConfig(target="onnx", out=tmp_path / "art", eval=loaded.card.extra["split"]["data"]))
    assert res.parity_status == "pass" and res.manifest["preprocessing"]["channels"] == 1
    acc = res.manifest["accuracy"]                          # the run's own held-out split, in onnxruntime
    assert acc["samples"] == result["dataset"]["val"] and "held-out split" in acc["data"]
    assert acc["artifact"]["top1"] == acc["torch"]["top1"] == pytest.approx(result["val_acc"])


def test_a_previous_run_is_not_overwritten_without_resume_or_force(tiny_run, digits_npz):
    out, _ = tiny_run
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a training run"):
        train(make_config("supervised", data=str(digits_npz), out=str(out), **TINY))
    assert (out / "model.safetensors").read_bytes() == before


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_run, tmp_path, digits_npz):
    full_out, _ = tiny_run
    out = tmp_path / "interrupted"
    cfg = make_config("supervised", data=str(digits_npz), out=str(out), **TINY)

    def stop_after_first(epoch, model):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch_end=stop_after_first)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    train(cfg, resume=True)
    a, b = load_file(str(full_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, digits_npz):
    out = tmp_path / "nan"
    cfg = make_config("supervised", data=str(digits_npz), out=str(out), **TINY)

    def poison(epoch, model):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="last good checkpoint \\(epoch 0\\)"):
        train(cfg, on_epoch_end=poison)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_kd_with_a_teacher_and_teacher_errors(tiny_run, tmp_path, digits_npz):
    teacher_dir, _ = tiny_run
    cfg = make_config("kd", data=str(digits_npz), out=str(tmp_path / "kd"), teacher=str(teacher_dir), loss="dkd",
                      **{**TINY, "epochs": 1})
    result = train(cfg)
    assert result["history"][0]["train_loss"] > 0 and Path(result["model_path"]).is_file()
    with pytest.raises(UsageError, match="teacher cannot load"):
        train(make_config("kd", data=str(digits_npz), out=str(tmp_path / "x"), teacher=str(tmp_path / "nope.safetensors"),
                          **TINY))
    five = tmp_path / "five.npz"
    z = np.load(digits_npz)
    keep = z["y"] < 5
    np.savez(five, x=z["x"][keep], y=z["y"][keep])
    with pytest.raises(UsageError, match="predicts 10 classes but the data has 5"):
        train(make_config("kd", data=str(five), out=str(tmp_path / "y"), teacher=str(teacher_dir), **TINY))


class _Payload:
    """Unpickling this creates a directory: proof that a peer's pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def _tree(root: int) -> set[int]:
    import os

    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += kids.get(pid, [])
    return out


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds (/proc/net/tcp and tcp6)."""
    import os
    import socket

    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:          # 0A: LISTEN
                hexaddr, port = f[1].split(":")
                raw = b"".join(bytes.fromhex(hexaddr[i:i + 8])[::-1] for i in range(0, len(hexaddr), 8))
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def _loopback(addr: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _attack(port: int, sentinel: Path) -> None:
    """What the reported exploit did: write a pickled payload into the rendezvous keys of a store on `port`."""
    import pickle
    import socket
    from datetime import timedelta

    payload = pickle.dumps(_Payload(sentinel))
    try:
        store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=2),
                                           wait_for_workers=False)
        for key in ("torch.rendezvous.none.state", "torch.rendezvous.default.state", "torch.elastic.agent"):
            store.set(key, payload)
    except Exception:
        pass
    try:       # and raw, for whatever else listens there
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(payload)
    except OSError:
        pass


def _run_ddp_under_attack(*args: str, sentinel: Path) -> tuple[int, dict | None, str, set[tuple[str, int]]]:
    """Run `effai ARGS` while probing its process tree's listening sockets and attacking each one."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "effai", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int]] = set()
    attacked: set[int] = set()
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        now = _listening(_tree(proc.pid))
        seen |= now
        for _, port in now:
            if port not in attacked:
                attacked.add(port)
                _attack(port, sentinel)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    last = json.loads(lines[-1]) if lines else None
    return proc.returncode, last, err, seen


def test_nproc_a_failing_rank_is_one_error_line_and_a_bad_split_is_refused_before_ranks_start(tmp_path):
    """Ranks are effai's own processes: a rank's error is reported once (no traceback, no per-rank repeats), with
    its exit code; what every rank would refuse is refused before any rank starts."""
    base = ["train", "supervised", "--data", "digits", "--student", "resnet10t", "--input-size", "32", "--epochs", "1",
            "--nproc", "2", "--out", str(tmp_path / "r")]
    code, last, _, err = run_cli(*base, "--batch-size", "33")
    assert code == 2 and last["exit_code"] == 2 and "must be divisible by --nproc 2" in last["error"]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    code, last, _, err = run_cli(*base, "--batch-size", "32", "--lr", "1e12")
    assert code == 1 and last["exit_code"] == 1 and "loss became nan" in last["error"], err[-2000:]
    assert err.count("loss became") == 1 and "Traceback" not in err and "SIGTERM" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["supervised", "ofa"])
def test_ddp_on_two_cpu_processes_matches_single_process(tmp_path, digits_npz, tiny_run, recipe):
    """Two gloo processes, each on half of every global batch (BN synchronized), against one process on the whole
    batch; for OFA the DDP-wrapped distiller holds the frozen teacher and the trained projectors. Compared over the
    first steps: training this tiny net is chaotic (a 3e-7 weight perturbation changes the third step's gradient by
    ~7e-4, measured), so later steps amplify float reordering, not bugs."""
    z = np.load(digits_npz)
    small = tmp_path / "d100.npz"
    idx = np.concatenate([np.nonzero(z["y"] == c)[0][:10] for c in range(10)])
    np.savez(small, x=z["x"][idx], y=z["y"][idx])                 # 80 train + 20 val: 2 steps of 32
    args = ["train", "supervised", "--data", str(small), "--student", "resnet10t", "--input-size", "32",
            "--batch-size", "32", "--epochs", "1", "--json"]
    if recipe == "ofa":
        args = [*args[:1], "ofa", *args[2:], "--teacher", str(tiny_run[0]), "--set", "channels=1"]
    code1, single, _, err1 = run_cli(*args, "--out", str(tmp_path / "single"))
    assert code1 == 0, (single, err1)
    if recipe == "supervised":     # the same run also proves nothing network-facing is exposed (issue 21)
        code2, multi, err2, listeners = _run_ddp_under_attack(*args, "--out", str(tmp_path / "ddp"), "--nproc", "2",
                                                              sentinel=tmp_path / "pwned")
        assert listeners, "gloo's sockets were never seen: the probe proves nothing"
        assert all(_loopback(addr) for addr, _ in listeners), listeners
        assert not (tmp_path / "pwned").exists(), "a pickled payload written to a listening port was executed"
    else:
        code2, multi, _, err2 = run_cli(*args, "--out", str(tmp_path / "ddp"), "--nproc", "2")
    assert code2 == 0, err2[-3000:]
    assert multi["world_size"] == 2 and multi["ranks_in_sync"] is True and single["world_size"] == 1
    a = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    # OFA adds four projector branches to the chaotic first steps: float reordering alone reached 2.3e-4 (CI); a real
    # DDP defect (projector BNs not synchronized: 9.4e-3, measured) is far above the bound
    tol = 1e-3 if recipe == "ofa" else 1e-4
    worst = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    assert worst < tol, worst
    if recipe == "ofa":     # the projectors trained in both, identically
        assert a["aux"].keys() == b["aux"].keys() and a["aux"]
        worst = max(float((a["aux"][k].float() - b["aux"][k].float()).abs().max()) for k in a["aux"])
        assert worst < tol, worst
    ma = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert abs(ma[0]["train_loss"] - mb[0]["train_loss"]) < 1e-4 and ma[0]["val_acc"] == mb[0]["val_acc"]


@pytest.mark.slow
def test_ghostnetv3_recipe_end_to_end_on_an_image_folder(tmp_path):
    """The real recipe (effai GhostNetV3, 3 branches) on an ImageFolder of real digit photos, then effai export of
    its folded checkpoint with parity and accuracy in the runtime."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "digits_folder"
    for c in range(3):
        (root / f"digit_{c}").mkdir(parents=True)
        for i in np.nonzero(d.target == c)[0][:30]:
            Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).resize((64, 64)).save(
                root / f"digit_{c}" / f"{i}.png")
    run = tmp_path / "run"
    code, last, _, err = run_cli("train", "ghostnetv3", "--data", str(root), "--epochs", "2", "--batch-size", "24",
                                 "--out", str(run), "--json")
    assert code == 0, err[-2000:]
    assert last["folded"] is True and Path(last["model"]).is_file()
    record = json.loads((run / "train_record.json").read_text())
    assert record["val_acc"] == record["val_acc_before_fold"] and record["dataset"]["val"] == 18
    code, last, _, err = run_cli("export", "--weights", str(run / "model.safetensors"), "--target", "tflite",
                                 "--eval", str(root), "--out", str(tmp_path / "art"), "--json")
    assert code == 0, err[-2000:]
    art = last["artifacts"][0]
    assert art["parity"] == "pass" and art["accuracy"]["samples"] == 18
    assert art["accuracy"]["artifact_top1"] == art["accuracy"]["torch_top1"]
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["labels"] == ["digit_0", "digit_1", "digit_2"] and m["inputs"][0]["shape"] == [1, 3, 64, 64]


def test_a_crash_between_metrics_row_and_checkpoint_leaves_one_row_per_epoch(tiny_run, tmp_path, digits_npz,
                                                                              monkeypatch):
    """The loop appends an epoch's row, then checkpoints. Dying in between must not leave a second row for that epoch
    once --resume has redone it: the rows end up those of an uninterrupted run, one per epoch, in order."""
    from effai.train import checkpoint as ckpt

    full_out, _ = tiny_run
    out = tmp_path / "crashed"
    cfg = make_config("supervised", data=str(digits_npz), out=str(out), **TINY)
    save = ckpt.save_atomic

    def die_before_checkpoint_1(obj, path):
        if obj["epoch"] == 1:
            raise KeyboardInterrupt                  # killed after epoch 1's row, before its checkpoint
        save(obj, path)

    monkeypatch.setattr(ckpt, "save_atomic", die_before_checkpoint_1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(ckpt, "save_atomic", save)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0     # epoch 1 is redone on resume
    train(cfg, resume=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (full_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in ref], rel=1e-6)


def test_truncate_metrics_keeps_the_rows_the_checkpoint_holds_and_drops_a_torn_line(tmp_path):
    from effai.train.checkpoint import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"epoch": e, "loss": 1.0 / (e + 1)}) + "\n" for e in range(3))
    path.write_text(rows + '{"epoch": 3, "lo')                             # died while appending epoch 3's row
    truncate_metrics(path, "epoch", 1)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]
    assert path.read_text().endswith("\n")
    before = path.stat().st_mtime_ns
    truncate_metrics(path, "epoch", 5)                                      # nothing beyond: the file is untouched
    assert path.stat().st_mtime_ns == before
    truncate_metrics(path, "epoch", None)                                   # no checkpoint: start over
    assert not path.exists()
    truncate_metrics(path, "epoch", 2)                                      # no log yet: nothing to do
    assert not path.exists()


def test_dkd_warmup_follows_the_loops_epoch(tiny_run, tmp_path, digits_npz):
    """--set dkd_warmup=W needs the epoch: the loop tells the distiller at the start of every epoch."""
    cfg = make_config("kd", data=str(digits_npz), out=str(tmp_path / "w"), teacher=str(tiny_run[0]), loss="dkd",
                      dkd_warmup=2, **{**TINY, "epochs": 1, "warmup_epochs": 0})
    result = train(cfg)
    assert len(result["history"]) == 1 and result["history"][0]["train_loss"] > 0


def test_a_student_that_cannot_take_the_input_size_is_a_usage_error_before_training(tmp_path):
    code, last, _, err = run_cli("train", "ghostnetv3", "--input-size", "32", "--epochs", "1",
                                 "--out", str(tmp_path / "g"))
    assert code == 2 and "cannot take 32x32 inputs" in last["error"] and "--input-size" in last["error"], err
    assert not (tmp_path / "g" / "checkpoint.pt").exists()


def test_a_recipe_config_file_sets_options_and_the_command_line_wins(tmp_path):
    from effai.cli.train import config_sets

    toml = tmp_path / "r.toml"
    toml.write_text('student = "resnet10t"\ninput_size = 32\nhflip = false\nexits = ["blocks.2", "blocks.9"]\n')
    assert config_sets(toml, set(), None) == ["student=resnet10t", "input_size=32", "hflip=false",
                                              "exits=blocks.2,blocks.9"]
    assert config_sets(toml, {"student"}, ["input_size=64"]) == ["hflip=false", "exits=blocks.2,blocks.9",
                                                                  "input_size=64"]
    yml = tmp_path / "r.yaml"
    yml.write_text("epochs: 3\nlr: 0.01\n")
    assert config_sets(yml, set(), None) == ["epochs=3", "lr=0.01"]
    bad = tmp_path / "bad.toml"
    bad.write_text("student = \n")
    with pytest.raises(UsageError, match="does not parse"):
        config_sets(bad, set(), None)
    code, last, _, _ = run_cli("train", "supervised", "--config", str(yml.with_name("nope.toml")))
    assert code == 2 and "does not exist" in last["error"]
    toml.write_text("nonsense_key = 1\n")
    code, last, _, _ = run_cli("train", "supervised", "--config", str(toml), "--out", str(tmp_path / "o"))
    assert code == 2 and "nonsense_key" in last["error"]


def test_run_dir_helpers_refuse_a_changed_resume_and_clear_only_on_force(tmp_path):
    """The loops' shared run-dir helpers: a resume with other settings names them; --force clears the old run's files
    and folders, a plain run leaves them."""
    from effai.train import checkpoint as ckpt
    ckpt.check_same_run({"lr": 0.1, "resume": False}, {"lr": 0.1, "resume": True}, tmp_path / "c.pt")
    with pytest.raises(UsageError, match=r"other settings \(lr, seed\)"):
        ckpt.check_same_run({"lr": 0.1, "seed": 0}, {"lr": 0.2, "seed": 1, "resume": True}, tmp_path / "c.pt")
    ckpt.check_same_run({"iterations": 5}, {"iterations": 9}, tmp_path / "c.pt", ignore=("iterations",))
    out = tmp_path / "run"
    (out / "lm").mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"x")
    ckpt.prepare_run_dir(out, False, dirs=("lm",))
    assert (out / "checkpoint.pt").exists() and (out / "lm").is_dir()
    ckpt.prepare_run_dir(out, True, dirs=("lm",))
    assert not (out / "checkpoint.pt").exists() and not (out / "lm").exists() and out.is_dir()
