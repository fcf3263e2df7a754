"""`effai train RECIPE`: the training recipes behind one command.

Recipes on the shared loop (effai/train/loop.py): ghostnetv3, kd, supervised, ofa. Recipes with their own loop:
cdfkd (data-free, effai/train/cdfkd) and devit (decomposition, effai/train/devit). Every recipe's config is a frozen
dataclass; `--set KEY=VALUE` reaches any of its fields (typed by the dataclass).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError


# Recipes with a loop of their own: name -> (module, config class, entry point).
OWN_LOOP = {"cdfkd": ("effai.train.cdfkd", "CdfkdConfig", "train_cdfkd"),
            "devit": ("effai.train.devit", "DevitConfig", "train_devit"),
            "sr": ("effai.train.sr", "SrConfig", "train_sr"),
            "ademvl": ("effai.train.ademvl", "AdemvlConfig", "train_ademvl"),
            "adem-vl": ("effai.train.ademvl", "AdemvlConfig", "train_ademvl"),
            "delvm": ("effai.train.delvm", "DelvmConfig", "train_delvm")}


def train_cmd(
    recipe: Annotated[str, typer.Argument(help="ghostnetv3 | kd | supervised | ofa | cdfkd | devit | sr | ademvl")],
    data: Annotated[str, typer.Option(help="'digits', an ImageFolder directory, or a CIFAR-style .npz.")] = "digits",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (checkpoint, metrics.jsonl, "
                                                "model.safetensors); default runs/<recipe>[-<student>].")] = None,
    student: Annotated[Optional[str], typer.Option(help="Model to train, zoo or timm name (ghostnetv3 recipe: "
                                                   "ghostnetv3_050|100|130|160).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher: an effai run dir / .safetensors, or a model name.")] = None,
    teachers: Annotated[Optional[str], typer.Option(help="cdfkd: comma list of teacher run dirs / .safetensors.")] = None,
    teacher_weights: Annotated[Optional[str], typer.Option(help="Weights for a teacher given by name.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Distillation loss: kd | dkd | dist.")] = None,
    parts: Annotated[Optional[int], typer.Option(help="devit: number of sub-models (devices).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (recipe default 15).")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="cdfkd: adversarial iterations.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (default 64).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate per 128 images (SGD 0.05; AdamW 1e-3 for token "
                                                "models).")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Training resolution (default 64).")] = None,
    branches: Annotated[Optional[int], typer.Option(help="GhostNetV3 training-time branches (default 3).")] = None,
    real_samples: Annotated[Optional[int], typer.Option(help="cdfkd: real images for the attention aggregation "
                                                        "(default 0: mean of headers).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for init, split, data order and augmentation.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE for any field of the recipe's config "
                                                      "(repeatable), e.g. --set ofa_eps=1.5 --set exits=blocks.2,blocks.9.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A .toml or .yaml file of KEY: value recipe "
                                                   "options (the --set keys); flags and --set override it.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an OUT that holds a previous run.")] = False,
    nproc: Annotated[int, typer.Option(help="Data-parallel processes on this machine (gloo on loopback on CPU, nccl on GPU); nothing listens on the network.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Train a compact model with a recipe (KD / OFA-KD from a teacher, data-free CDFKD-MFS, DeViT), write model.safetensors."""
    from effai.train.progress import RichProgress

    try:
        if config is not None:
            set_ = config_sets(config, given={k for k, v in locals().items() if v is not None}, sets=set_)
    except EffaiError as e:
        fail(e, as_json)
    out_given = out is not None
    if out is None:   # one folder per recipe and student: runs of different recipes never refuse each other
        out = Path("runs") / (f"{recipe}-{student.replace('/', '_')}" if student else recipe)
    given = {"data": data, "out": str(out), "student": student, "teacher": teacher, "epochs": epochs,
             "batch_size": batch_size, "lr": lr, "input_size": input_size, "seed": seed}
    if config is not None:   # the file's keys apply where no flag or --set gives them
        flags = {k for k, v in given.items() if v is not None and (k != "out" or out_given)
                 and not (k == "data" and v == "digits")}
        try:
            set_ = config_sets(config, flags, set_)
        except EffaiError as e:
            fail(e, as_json)
        for pair in set_:
            key = pair.split("=", 1)[0].strip().replace("-", "_")
            if key in given and key not in flags:
                given[key] = None
    progress = None if as_json else RichProgress(console.err())
    try:
        if nproc < 1:
            raise UsageError(f"--nproc {nproc} must be >= 1")
        if recipe in OWN_LOOP:
            for name, value in (("--loss", loss), ("--teacher-weights", teacher_weights), ("--branches", branches)):
                if value is not None:
                    raise UsageError(f"{name} belongs to the shared loop's recipes (kd, ofa, ghostnetv3), not '{recipe}'")
            result = _run_own_loop(recipe, {**given, "teachers": teachers, "parts": parts, "iterations": iterations,
                                            "real_samples": real_samples}, set_, resume, force, progress, nproc)
        else:
            for name, value in (("--teachers", teachers), ("--parts", parts), ("--iterations", iterations),
                                ("--real-samples", real_samples)):
                if value is not None:
                    raise UsageError(f"{name} belongs to recipe {'cdfkd' if name != '--parts' else 'devit'}, not "
                                     f"'{recipe}'")
            result = _run_loop(recipe, {**given, "teacher_weights": teacher_weights, "loss": loss,
                                        "num_branches": branches}, set_, resume, force, progress, nproc, as_json)
    except EffaiError as e:
        fail(e, as_json)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    model = result.get("model_path")
    summary = {"ok": True, "recipe": recipe, "out": str(out), "model": model, "val_acc": result.get("val_acc"),
               **{k: v for k, v in result.items() if k not in ("model_path", "val_acc", "history", "config", "out")
                  and isinstance(v, (int, float, str, bool, type(None)))}}
    if not as_json and model:
        acc = f"  held-out accuracy {summary['val_acc']:.2%}" if isinstance(summary["val_acc"], float) else ""
        how = (f"effai devit export {out} --target all (every part and the fusion head), then effai devit run {out}"
               if recipe == "devit" else f"effai sr export {out} --target all" if recipe == "sr"
               else f"effai.zoo.ademvl.load('{out}') (docs/ademvl.md)" if recipe in ("ademvl", "adem-vl")
               else f"effai delvm export {out} --out ART (docs/delvm.md)" if recipe == "delvm"
               else f"effai export --weights {model} --target all")
        console.err().print(f"[green]✓[/] wrote {model}{acc}{' (folded)' if summary.get('folded') else ''}; export "
                            f"it with: {how}")
    console.json_line(summary)


def _merge(given: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """The options given as flags (None: not given) and as --set; the same field both ways must agree."""
    opts = {k: v for k, v in given.items() if v is not None}
    for k, v in sets.items():
        if k in opts and opts[k] != v:
            raise UsageError(f"{k} is given twice ({opts[k]!r} as an option, {v!r} with --set); pass it once")
        opts[k] = v
    return opts


def _run_loop(recipe: str, given: dict[str, Any], sets: list[str] | None, resume: bool, force: bool,
              progress: Any, nproc: int, as_json: bool) -> dict[str, Any]:
    from effai.train.overrides import parse_sets
    from effai.train.recipes import TrainConfig, make_config

    cfg = make_config(recipe, **_merge(given, parse_sets(TrainConfig, sets)))
    if cfg.teacher:
        from effai.train.losses import LOSSES

        LOSSES.get(cfg.loss)
    from effai.train.loop import preflight, train

    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--nproc starts its own ranks; under torchrun (or another launcher) drop --nproc")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) == 0 and not as_json:
        console.err().print("[yellow]! started by an external launcher (torchrun): its rendezvous store is reachable "
                            "by the network it listens on and unauthenticated; use it only on a trusted network "
                            "(docs/security.md)[/]")
    if nproc > 1:
        preflight(cfg, nproc, resume=resume, force=force)
    if not cfg.teacher and not as_json:
        console.err().print(f"[yellow]! no --teacher: recipe '{recipe}' trains with cross-entropy only[/]")
    if nproc > 1:
        from effai.train.launch import run_local

        result = run_local(cfg, nproc, resume=resume, force=force, show_progress=progress is not None)
    else:
        result = train(cfg, resume=resume, force=force, progress=progress)
    last = result["history"][-1] if result["history"] else {}
    return {**result, "epochs": len(result["history"]), "train_acc": last.get("train_acc")}


def _run_own_loop(recipe: str, given: dict[str, Any], sets: list[str] | None, resume: bool, force: bool,
                  progress: Any, nproc: int) -> dict[str, Any]:
    from effai.train.overrides import parse_sets

    if nproc > 1:
        raise UsageError(f"recipe '{recipe}' runs in one process; drop --nproc")
    module, config_name, entry = OWN_LOOP[recipe]
    mod = importlib.import_module(module)
    config_cls = getattr(mod, config_name)
    opts = {k: v for k, v in given.items() if v is not None}
    if resume:
        opts["resume"] = True
    if "teachers" in opts:
        opts["teachers"] = tuple(t.strip() for t in opts["teachers"].split(",") if t.strip())
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(k for k in opts if k not in known and k not in ("data", "out"))
    if unknown:
        raise UsageError(f"recipe '{recipe}' does not take --{unknown[0].replace('_', '-')}; its options: "
                         f"{', '.join(sorted(known))}")
    if "resume" in opts and "resume" not in known:
        raise UsageError(f"recipe '{recipe}' cannot resume; run it again with --force")
    opts = {k: v for k, v in opts.items() if k in known}
    set_opts = parse_sets(config_cls, sets)
    cfg = config_cls(**_merge(bound_stage_epochs(config_cls, opts, set_opts), set_opts))
    return getattr(mod, entry)(cfg, force=force, progress=progress)


def config_sets(path: Path, given: set[str], sets: list[str] | None) -> list[str]:
    """A recipe config file (.toml, or .yaml/.yml with PyYAML) as --set KEY=VALUE strings, placed before the
    command line's own --set and skipping keys a flag or --set gives (the command line wins)."""
    if not path.is_file():
        raise UsageError(f"--config {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if len(text) > 1 << 20:
        raise UsageError(f"--config {path} is over 1 MB; a recipe config is a few lines")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError("--config .yaml needs PyYAML (pip install pyyaml), or write it as .toml") from None
            data = yaml.safe_load(text)
        else:
            raise UsageError(f"--config {path}: use a .toml or .yaml file")
    except UsageError:
        raise
    except Exception as e:   # tomllib.TOMLDecodeError, yaml.YAMLError
        raise UsageError(f"--config {path} does not parse ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold KEY: value pairs (the --set keys of the recipe)")
    overridden = {k.split("=", 1)[0].strip().replace("-", "_") for k in sets or []} | given
    pairs = []
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in overridden:
            continue
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        elif isinstance(v, dict) or v is None:
            raise UsageError(f"--config {path}: {key} must be a number, string, boolean or list")
        pairs.append(f"{key}={v}")
    return pairs + list(sets or [])


def bound_stage_epochs(config_cls: Any, opts: dict[str, Any], set_opts: dict[str, Any]) -> dict[str, Any]:
    """--epochs bounds every stage of a recipe (`*_epochs` fields: fine-tuning, ensemble, pruning recovery, warmup)
    unless that stage's own option is given with --set."""
    import dataclasses

    if "epochs" not in opts:
        return opts
    out = dict(opts)
    for f in dataclasses.fields(config_cls):
        if f.name.endswith("_epochs") and f.name not in set_opts and isinstance(f.default, int):
            out[f.name] = min(f.default, int(opts["epochs"]))
    return out


def register(app: typer.Typer) -> None:
    app.command("train", context_settings={"allow_extra_args": False})(train_cmd)
