"""What every command module shares: the --json option, the one error exit, and parsing of shapes, targets
and precisions (checked before anything loads)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from effai import console
from effai.errors import EffaiError, UsageError

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output only (one JSON object).")]


def fail(e: EffaiError, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    kind = "usage error" if e.exit_code == 2 else "error"
    if not as_json:
        console.err().print(f"[bold red]{kind}:[/] {e}")
    console.json_line({"ok": False, "error": str(e), "exit_code": e.exit_code, **(extra or {})})
    raise typer.Exit(e.exit_code)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UsageError(f"--input-shape '{text}' must look like 1x3x224x224") from None
    if len(dims) != 4 or min(dims) < 1:
        raise UsageError(f"--input-shape '{text}' must be 4 positive numbers N x C x H x W, like 1x3x224x224")
    return dims


def quantize_help() -> str:
    from effai.export.precisions import help_text
    from effai.export.targets import TARGETS

    return ("Precision: fp32/fp16 or a quantization (default fp16 on coreml, fp32 elsewhere). Per target: "
            + help_text({n: t.precisions for n, t in TARGETS.items()}) + ". Meanings: docs/quantization.md.")


QUANTIZE_HELP = quantize_help()


def default_precision(target: str) -> str:
    from effai.export.targets import TARGETS

    return TARGETS.get(target).precisions[0]


def check_precision(precision: str, targets: list[str]) -> None:
    """Up front, before any model is loaded: every chosen target must take this precision."""
    from effai.export.plan import require

    for t in targets:
        require(t, precision)


def parse_targets(text: str, skipped: dict[str, str] | None = None) -> list[str]:
    """Target names from --target; for 'all', the available ones (the others go into `skipped` with the reason)."""
    from effai.export.targets import TARGETS

    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        avail = [n for n, t in TARGETS.items() if t.available()[0]]
        if skipped is not None:
            skipped.update({n: t.available()[1] for n, t in TARGETS.items() if n not in avail})
        if not avail:
            missing = "; ".join(f"{n}: {t.available()[1]}" for n, t in TARGETS.items())
            raise EffaiError(f"--target all: no export toolchain is installed ({missing})")
        return avail
    for n in names:
        TARGETS.get(n)  # unknown -> UsageError listing the choices
    if not names:
        raise UsageError(f"--target is empty; choose from: {', '.join(TARGETS.names())} or all")
    return names


def progress_printer(ui: Any, target: str):
    status: dict[str, Any] = {}

    def cb(event: str, stage: str, detail: str, seconds: float) -> None:
        if event == "start":
            status["s"] = ui.status(f"{target}: {stage} {detail}", spinner="dots")
            status["s"].__enter__()
            return
        if "s" in status:
            status.pop("s").__exit__(None, None, None)
        mark = "[green]✓[/]" if event == "end" else "[red]✗[/]"
        ui.print(f"{mark} {stage:<9} {seconds:6.2f}s  [dim]{target}[/] {detail}")

    return cb
