"""Shared fixtures: tiny inputs, session-scoped exports reused by many tests, a CLI runner (real subprocess)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers import DEVIT_SIZE, SMALL, randomize_bn


# Files by their measured cost (seconds on the 2-core CI host), the dearest first. Under pytest-xdist a file is one unit
# of work (--dist loadfile) handed out in collection order (--no-loadscope-reorder), so starting the long files first
# keeps one worker from picking up a 10-minute file just as the other runs out of work. Unlisted files follow in their
# usual order; a wrong or stale entry only costs balance, never correctness.
HEAVY_FIRST = ("test_quantize_digits.py", "test_export_matrix.py", "test_quantize_fallback.py", "test_devit.py",
               "test_export.py", "test_cli.py", "test_bundle_pack.py", "test_fold.py", "test_quantize.py",
               "test_train.py", "test_hostile_files.py", "test_bench_adb.py", "test_generate.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: order inside a file is kept


@pytest.fixture(autouse=True, scope="module")
def _torch_threads_restored():
    """A module that changes torch's thread count (to time or to make a run reproducible) gives it back: outputs
    computed later in the same process (bundle determinism, parity references) must not depend on test order."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory):
    """240 real digits (24 per class) as a CIFAR-style .npz: small enough for quick epochs."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.concatenate([np.nonzero(d.target == c)[0][:24] for c in range(10)])
    x = np.round(d.images[idx] * 255 / 16).astype(np.uint8)[..., None]      # N,8,8,1
    path = tmp_path_factory.mktemp("data") / "digits240.npz"
    np.savez(path, x=x, y=d.target[idx], classes=np.array([str(i) for i in range(10)]))
    return path




@pytest.fixture(scope="session")
def devit_teacher(tmp_path_factory, digits_npz):
    """A vit_tiny checkpoint on the 240 digits (random init: the DeViT tests check the pipeline, the benchmark its
    accuracy), shared by every DeViT test module."""
    from effai import zoo
    from effai.data import datasets as data_mod
    from effai.train.models import build_student, save_model
    from effai.train.recipes import make_config

    root = tmp_path_factory.mktemp("devit_teacher")
    cfg = make_config("supervised", student="vit_tiny", data=str(digits_npz), input_size=DEVIT_SIZE, channels=1,
                      out=str(root), fold=False)
    full = data_mod.load(cfg.data, DEVIT_SIZE, 1)
    _, val = data_mod.split(full, 0.2, cfg.seed)
    _, card = build_student(cfg, full.classes)
    card = card.with_(extra={**card.extra, "arch_kwargs": {"patch_size": 4}})
    torch.manual_seed(0)
    model = zoo.build(card)
    save_model(model, card, cfg, root, val, {"dataset": {"source": str(digits_npz)}, "history": [], "world_size": 1},
               "raw")
    return root


def _exported_once(tmp_path_factory, name, build):
    """`build(root)` exports into root/<target> and returns {target: ExportResult}. Run serially it just runs; under
    pytest-xdist (tests split by file over workers) the first worker that needs it exports into a folder every worker
    sees (the run's base temp dir) and the others wait on its lock and read the artifacts back from their manifests,
    so a 4-target export is paid once per run, not once per worker."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    from effai.export.pipeline import ExportResult

    shared = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{shared}.lock"):
        done = shared / "exported.json"
        if done.is_file():
            return {t: ExportResult(shared / t, json.loads((shared / t / "manifest.json").read_text()))
                    for t in json.loads(done.read_text())}
        shared.mkdir(exist_ok=True)
        results = build(shared)
        done.write_text(json.dumps(sorted(results)))
        return results


@pytest.fixture(scope="session")
def small_exports(tmp_path_factory):
    """ghostnetv3_050 at 64x64 exported once to every target; many tests read these artifacts."""
    from effai import zoo
    from effai.export.pipeline import ExportConfig, export

    def build(root):
        loaded = zoo.create("ghostnetv3_050")
        randomize_bn(loaded.model)
        return {t: export(loaded, ExportConfig(target=t, input_size=SMALL, out=root / t))
                for t in ("executorch", "onnx", "tflite", "coreml")}

    return _exported_once(tmp_path_factory, "exports", build)


@pytest.fixture(scope="session")
def digits_exports(tmp_path_factory):
    """ghostnetv3_050.digits exported once at each target's default precision (its card's size, top-1 on its
    held-out digits) to every target; shared by the export matrix's accuracy check and the int8 size comparison."""
    from effai import zoo
    from effai.export.pipeline import ExportConfig, export
    from effai.export.targets import TARGETS

    def build(root):
        loaded = zoo.create("ghostnetv3_050.digits")
        return {t: export(loaded, ExportConfig(target=t, precision=TARGETS.get(t).precisions[0], out=root / t))
                for t in ("executorch", "onnx", "tflite", "coreml")}

    return _exported_once(tmp_path_factory, "digits_exports", build)
