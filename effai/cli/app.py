"""The `effai` command: one typer app, a module per command group (effai/cli/*.py, each with `register`), and the
entry point that turns every failure into a message, a final JSON line and an exit code (0 ok, 2 usage, 1 other,
130 interrupted)."""

from __future__ import annotations

import os
import sys

import typer

from effai import console
from effai.cli import bench, benchmark, bundle, collab, delvm, devit, export, generate, predict, split, sr, train, zoo
from effai.errors import EffaiError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fold, export and verify compact vision models for phones and edge boards.")


def _version(value: bool) -> None:
    if value:
        from effai.version import __version__

        console.out().print(f"effai {__version__}")
        console.json_line({"ok": True, "version": __version__})
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print effai's version and exit.")) -> None:
    """Fold, export and verify compact vision models for phones and edge boards."""


export.register(app)
predict.register(app)
benchmark.register(app)
app.add_typer(zoo.zoo_app, name="zoo")
app.add_typer(bundle.bundle_app, name="bundle")
bundle.add_aliases(zoo.zoo_app)
train.register(app)
devit.register(app)
bench.register(app)
split.register(app)
collab.register(app)
generate.register(app)
sr.register(app)
delvm.register(app)


def main() -> None:
    """Console-script entry: unexpected exceptions still end with a message, a JSON line and exit code 1."""
    from typer._click import exceptions as click_exc   # typer vendors click

    console.reset()
    try:
        rc = app(standalone_mode=False)
        if rc == 130 and not console.json_written():   # typer turns Ctrl-C into Exit(130) before effai sees it
            raise KeyboardInterrupt
        sys.exit(rc if isinstance(rc, int) else 0)
    except click_exc.NoArgsIsHelpError:   # `effai` alone: the help was printed
        console.json_line({"ok": False, "error": "no command given", "exit_code": 2})
        sys.exit(2)
    except click_exc.ClickException as e:  # bad option, missing argument, bad value: exit 2 + JSON line
        e.show()
        console.json_line({"ok": False, "error": e.format_message(), "exit_code": e.exit_code})
        sys.exit(e.exit_code)
    except (typer.Exit, typer.Abort) as e:
        sys.exit(getattr(e, "exit_code", 1))
    except SystemExit:
        raise
    except EffaiError as e:
        console.err().print(f"[bold red]error:[/] {e}")
        console.json_line({"ok": False, "error": str(e), "exit_code": e.exit_code})
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.err().print("[red]interrupted[/]; nothing half-written was left behind")
        console.json_line({"ok": False, "interrupted": True, "error": "interrupted", "exit_code": 130})
        sys.exit(130)
    except Exception as e:  # a bug in effai or a toolchain: still one clear line, a JSON line and exit 1
        if os.environ.get("EFFAI_DEBUG"):
            raise
        console.err().print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (rerun with EFFAI_DEBUG=1 for the "
                            "traceback, and please report it)")
        console.json_line({"ok": False, "error": f"internal error: {type(e).__name__}: {e}", "exit_code": 1})
        sys.exit(1)
