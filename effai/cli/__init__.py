"""effai's command line (typer): `app` and the console-script entry `main` live in effai/cli/app.py."""

from effai.cli.app import app, main

__all__ = ["app", "main"]
