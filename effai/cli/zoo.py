"""`effai zoo list|show`: the model cards (any timm model name works too)."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from effai import console
from effai.cli.common import JsonOpt, fail
from effai.errors import EffaiError, UsageError

zoo_app = typer.Typer(no_args_is_help=True, help="Model cards: what effai can build and export.")


@zoo_app.command("list")
def zoo_list(
    pattern: Annotated[Optional[str], typer.Argument(help="Filter names: a glob (ghostnet*) or a substring.")] = None,
    timm_names: Annotated[bool, typer.Option("--timm", help="Also list timm's model names matching PATTERN (any of "
                                             "them exports too).")] = False,
    bundles: Annotated[Optional[Path], typer.Option("--bundles", help="Directory of bundles (effai bundle pack --out): "
                                                    "adds each model's best measured latency per device class "
                                                    "[default: ./bundles when it exists]")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The zoo's model cards with task, size and cost (any timm model name works too)."""

    from effai.export.quiet import runtime_quiet
    from effai.zoo import CARDS

    try:
        if bundles is not None and not bundles.is_dir():
            raise UsageError(f"--bundles {bundles} is not a directory; pass the --out of `effai bundle pack`")
        bundle_dir = bundles if bundles is not None else (Path("bundles") if Path("bundles").is_dir() else None)
        latency = _bundle_latency(bundle_dir) if bundle_dir is not None else {}
        glob = pattern if pattern is None or any(ch in pattern for ch in "*?[") else f"*{pattern}*"
        with runtime_quiet():   # building a card the stats cache lacks imports toolchains that warn (torch's pytree)
            rows = [_zoo_row(n, c, latency.get(n)) for n, c in CARDS.items() if glob is None or fnmatch(n, glob)]
        others = []
        if timm_names:
            import timm

            others = [n for n in timm.list_models(glob or "*") if n not in CARDS.names()]
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        console.out().print(_zoo_table(rows, console.out().width))
        if others:
            console.out().print(f"timm ({len(others)}): " + ", ".join(others[:200])
                                + (f", ... ({len(others) - 200} more)" if len(others) > 200 else ""))
    console.json_line({"ok": True, "models": rows, "timm": others, "params_form": "deploy (folded)", "bundles": str(bundle_dir) if bundle_dir is not None else None,
                       "macs_convention": "1 MAC = one multiply-add over Conv2d/Linear of the deploy form at the "
                                          "card's input size, batch 1 (docs/bundle.md)"})


# Columns by value: the least valuable are dropped first when the terminal is narrow (rich would otherwise squeeze
# every column to one character a line). Each kept column shows whole values; names fold only below ~30 columns.
_ZOO_PRIORITY = ("name", "params (deploy)", "input", "MACs", "weights", "family", "license", "best latency", "task")


def _zoo_table(rows: list[dict[str, Any]], width: int) -> Any:
    """The zoo table with the columns that fit `width` (whole values), in _ZOO_PRIORITY order; a caption says which
    columns were dropped (all are in --json)."""
    from rich.table import Table

    cells: dict[str, list[str]] = {c: [] for c in _ZOO_PRIORITY}
    for r in rows:
        best = "; ".join(f"{cls} {b['median_ms']:.2f} ms" for cls, b in (r["best_latency"] or {}).items()) or "-"
        macs = f"{r['macs'] / 1e9:.2f} G" if r["macs"] >= 1e9 else f"{r['macs'] / 1e6:.1f} M"
        for col, value in (("name", r["name"]), ("task", r["task"]), ("family", r["family"]),
                           ("params (deploy)", f"{r['params'] / 1e6:.2f} M"), ("MACs", macs), ("input", r["input"]),
                           ("license", r["license"].split(" (")[0]), ("weights", r["weights_available"]),
                           ("best latency", best)):
            cells[col].append(value)
    if all(v == "-" for v in cells["best latency"]):
        del cells["best latency"]          # no bundles measured: nothing to show
    tasks = set(cells["task"])
    if len(tasks) <= 1:
        del cells["task"]                  # one task for every card: said once in the caption
    keep, used = [], 1                     # used: the table's left border
    for col in [c for c in _ZOO_PRIORITY if c in cells]:
        need = max([len(col), *map(len, cells[col])]) + 3   # padding 2 + separator 1
        if col == "name" or used + need <= width:
            keep.append(col)
            used += need
    dropped = [c for c in cells if c not in keep]
    caption = "; ".join(filter(None, (f"task: {next(iter(tasks))}" if len(tasks) == 1 else "",
                                      f"hidden at this width: {', '.join(dropped)} (see --json)" if dropped else "")))
    table = Table(title="effai zoo", caption=caption or None)
    order = [c for c in ("name", "task", "family", "params (deploy)", "MACs", "input", "license", "weights",
                         "best latency") if c in keep]
    for col in order:
        table.add_column(col, overflow="fold", no_wrap=col != "name")
    for i in range(len(rows)):
        table.add_row(*(cells[c][i] for c in order))
    return table


def _zoo_row(name: str, c: Any, best: dict[str, Any] | None) -> dict[str, Any]:
    from effai.export.stats import card_stats

    stats = card_stats(name)
    return {"name": name, "task": c.task, "family": c.family, "params": stats["params"], "macs": stats["macs"],
            "input": "x".join(map(str, c.input_size)), "input_size": list(c.input_size), "classes": c.num_classes,
            "license": c.weights_license, "reparameterizable": c.reparameterizable,
            "weights": "bundled" if c.bundled_weights else "hub (--pretrained) / --weights; random-init without",
            "weights_available": "bundled" if c.bundled_weights else "hub",
            "description": c.description, "best_latency": best}


def _bundle_latency(root: Path) -> dict[str, dict[str, Any]]:
    """{model name: best measured latency per device class} over the bundles under root (root may be one bundle)."""
    from effai.bundle import index as bundle_index

    try:
        from effai.bundle.perf import best_latency
    except ImportError:
        best_latency = _best_latency_rows
    out: dict[str, dict[str, Any]] = {}
    for b in ([root] if (root / "bundle.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())):
        try:
            name = bundle_index.read(b)["model"]["name"]   # checked (hostile JSON too): a bad bundle is skipped
        except (EffaiError, KeyError, TypeError):
            continue
        try:
            best = best_latency(b)
        except EffaiError:      # an unreadable perf.json: that bundle shows no latency, the catalogue still lists
            continue
        if best:
            out[name] = best
    return out


def _best_latency_rows(root: Path) -> dict[str, dict[str, Any]]:
    from effai.bundle.model_card_md import perf_rows

    best: dict[str, dict[str, Any]] = {}
    for r in perf_rows(root):
        cls, ms = r.get("device_class"), r.get("median_ms")
        if isinstance(cls, str) and isinstance(ms, (int, float)) and (cls not in best or ms < best[cls]["median_ms"]):
            best[cls] = {k: r.get(k) for k in ("median_ms", "p90_ms", "device", "target", "precision", "threads")}
    return best


@zoo_app.command("show")
def zoo_show(name: Annotated[str, typer.Argument(help="Zoo or timm model name.")], as_json: JsonOpt = False) -> None:
    """One model card in full, with its parameter count."""
    from effai import zoo
    from effai.export.quiet import runtime_quiet

    try:
        with runtime_quiet():   # toolchain warnings (torch's pytree, timm) while building: off the user's stderr
            loaded = zoo.create(name)
            params_deploy = _deploy_params(name)
    except EffaiError as e:
        fail(e, as_json)
    card = loaded.card
    info = {"name": card.name, "task": card.task, "family": card.family, "source": card.source,
            "input_size": list(card.input_size), "num_classes": card.num_classes, "label_set": card.label_set,
            "labels_preview": zoo.labels(card)[:5],
            "preprocessing": card.preprocessing(), "weights_license": card.weights_license,
            "reparameterizable": card.reparameterizable, "bundled_weights": card.bundled_weights,
            "params_training_form": sum(p.numel() for p in loaded.model.parameters()),
            "params_deploy_form": params_deploy, "description": card.description,
            "weights": loaded.weights.source, "weights_sha256": loaded.weights.sha256}
    record = card.extra.get("train_record")
    if record:
        cfg = record.get("config", {})
        info["trained"] = {"recipe": record.get("recipe"), "data": cfg.get("data"), "teacher": cfg.get("teacher"),
                           "loss": cfg.get("loss"), "epochs": record.get("epochs"),
                           "held_out_top1": record.get("val_acc"), "folded": record.get("folded")}
    if not as_json:
        from rich.table import Table

        table = Table(title=card.name, show_header=False)
        for k, v in info.items():
            table.add_row(k, str(v))
        console.out().print(table)
    console.json_line({"ok": True, "model": info})


def _deploy_params(name: str) -> int | None:
    """Parameters after fold (what an exported artifact holds); None where the card cannot be measured."""
    from effai.export.stats import card_stats

    try:
        return card_stats(name)["params"]
    except Exception:   # a timm model whose deploy form cannot be built here: the training count still stands
        return None
