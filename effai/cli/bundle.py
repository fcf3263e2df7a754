"""`effai bundle pack | keygen | sign | verify | unpack | install | archive` (the old `effai zoo ...` spellings are
hidden aliases for one release). Exit codes: 1 a bundle that fails verification, 2 bad input. No torch imported
except by `pack`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from effai import console
from effai.cli.common import JsonOpt, fail, parse_targets, progress_printer
from effai.errors import EffaiError

PubkeyOpt = Annotated[Optional[Path], typer.Option("--pubkey", help="The signer's public key (KEY.pub from effai zoo "
                                                   "keygen): the bundle must be signed by it.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an earlier effai unpack/install at --into.")]


def _done(info: dict[str, Any], as_json: bool, line: str) -> None:
    """A bundle command's ending: its notes, one success line, the JSON object."""
    _notes(info.get("notes", []), as_json)
    if not as_json:
        console.err().print(f"[green]✓[/] {escape(line)}", highlight=False)
    console.json_line({"ok": True, **info})


def _notes(notes: list[str], as_json: bool) -> None:
    if not as_json:
        for n in notes:
            console.err().print(f"[yellow]! {escape(n)}[/]", highlight=False)


def keygen_cmd(
    key: Annotated[Path, typer.Argument(help="Private key file to write (the public key goes to KEY.pub).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make an Ed25519 key pair for signing bundles: KEY (private, 0600) and KEY.pub (publish this one)."""
    from effai.bundle import sign

    try:
        info = sign.keygen(key, force=force)
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        console.err().print(f"[green]✓[/] private key {info['private']} (keep it secret), public key "
                            f"{info['public']} (key_id {info['key_id']})")
    console.json_line({"ok": True, **info})


def sign_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by effai bundle pack.")],
    key: Annotated[Path, typer.Option("--key", "-k", help="Private key from effai bundle keygen.")],
    force: Annotated[bool, typer.Option("--force", help="Sign even though the current signature is invalid or "
                                        "was removed (only for a bundle you packed and changed yourself).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Sign a bundle you packed: bundle.json with Ed25519 (writes bundle.sig; replaces an earlier valid signature)."""
    from effai.bundle import sign

    try:
        info = sign.sign_bundle(bundle, key, force=force)
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        if info.get("replaced"):
            _notes([f"replaced the signature by key {info['replaced']}"], as_json)
        console.err().print(f"[green]✓[/] signed {bundle} with key {info['key_id']}; check it with: effai bundle verify "
                            f"{bundle} --pubkey {key}.pub")
    console.json_line({"ok": True, "bundle": str(bundle), **info})


def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory, or a .zip / .tar.gz of one.")],
    pubkey: PubkeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every file's hash against bundle.json and the signature; name exactly what changed."""
    from effai.bundle import archive, sign

    try:
        with archive.opened(bundle) as root:
            result = sign.verify(root, pubkey)
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        ui = console.err()
        for p in result.problems:
            ui.print(f"[bold red]✗[/] {escape(p)}", highlight=False)
        _notes(result.notes, as_json)
        if result.ok:
            what = {"valid": f"signature valid (key {result.key_id}"
                             + (", the key you gave)" if result.trusted else ")"),
                    "unsigned": "unsigned"}[result.signature]
            ui.print(f"[green]✓[/] {bundle}: all {result.files} files match bundle.json; {what}")
        else:
            ui.print(f"[bold red]{bundle} failed verification[/] ({len(result.problems)} problem"
                     f"{'s' if len(result.problems) != 1 else ''}; signature {result.signature})")
    summary: dict[str, Any] = {"bundle": str(bundle), **result.to_dict()}
    if not result.ok:
        summary["error"] = result.problems[0] if result.problems else f"signature {result.signature}"
        summary["exit_code"] = 1
    console.json_line(summary)
    if not result.ok:
        raise typer.Exit(1)


def unpack_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory, or a .zip / .tar.gz of one.")],
    into: Annotated[Path, typer.Option("--into", help="Folder to create with the whole verified bundle.")],
    pubkey: PubkeyOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy a whole bundle out of a directory or archive, verifying every file and the signature first."""
    from effai.bundle import install

    try:
        info = install.unpack(bundle, into, pubkey=pubkey, force=force)
    except EffaiError as e:
        fail(e, as_json)
    _done(info, as_json, f"unpacked {info['files']} verified files to {into} (signature {info['signature']})")


def install_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory, or a .zip / .tar.gz of one.")],
    into: Annotated[Path, typer.Option("--into", help="Folder to create for the app (e.g. MyApp/Models/digits).")],
    target: Annotated[str, typer.Option("--target", "-t", help="coreml | tflite | executorch | onnx")],
    precision: Annotated[Optional[str], typer.Option("--precision", "-q", "--quantize",
                                                     help="Which precision when the bundle has several.")] = None,
    pubkey: PubkeyOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy just what an app needs for one target (model, manifest.json, labels, preprocessing, card), verified."""
    from effai.bundle import install

    try:
        info = install.install(bundle, into, target, precision=precision, pubkey=pubkey, force=force)
    except EffaiError as e:
        fail(e, as_json)
    _done(info, as_json, f"installed {info['target']}/{info['precision']} to {into}: {', '.join(info['files'])} "
                         f"(signature {info['signature']})")


def archive_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by effai bundle pack.")],
    out: Annotated[Path, typer.Argument(help="Archive to write: NAME.zip, NAME.tar.gz or NAME.tgz.")],
    as_json: JsonOpt = False,
) -> None:
    """Ship a bundle as one file: a deterministic .zip or .tar.gz (verified before it is written)."""
    from effai.bundle import archive

    try:
        info = archive.make_archive(bundle, out)
    except EffaiError as e:
        fail(e, as_json)
    if not as_json:
        console.err().print(f"[green]✓[/] wrote {out} ({info['files']} files, {info['bytes']} bytes)")
    console.json_line({"ok": True, **info})


def pack_cmd(
    model: Annotated[str, typer.Argument(help="Zoo or timm model name (effai zoo list).")],
    targets: Annotated[str, typer.Option("--targets", "-t", help="Comma list of executorch, coreml, tflite, onnx "
                                         "(or all: the available ones).")] = "all",
    quantize: Annotated[Optional[str], typer.Option("--quantize", "-q", help="Comma list of precisions (fp32,int8,"
                                                    "...); each target gets those it takes, the others are skipped "
                                                    "with a note. Default: each target's default.")] = None,
    eval_data: Annotated[str, typer.Option("--eval", help="Top-1 of torch vs each artifact: auto (the card's own "
                                           "set), digits, an image folder, an .npz, or none.")] = "auto",
    max_drop: Annotated[float, typer.Option(help="Fail an artifact losing more top-1 points than this.")] = 1.0,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint (.safetensors or .pt/.pth, weights only).")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Download timm's hub weights (needs network).")] = False,
    sign_key: Annotated[Optional[Path], typer.Option("--sign", help="Ed25519 private key (effai bundle keygen): "
                                                     "writes bundle.sig over bundle.json.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundles directory; the bundle is <out>/<model>/.")] = Path("bundles"),
    as_json: JsonOpt = False,
) -> None:
    """Export a model to several targets and pack an app-ready bundle: artifacts, labels, preprocessing, model card
    and bundle.json (every file's sha256). Exit 1 with status "partial" when a target failed; 0 when complete."""
    from effai.bundle.pack import pack

    ui = console.err()
    skipped: dict[str, str] = {}
    try:
        names = parse_targets(targets, skipped)
        if skipped and not as_json:
            for n, why in skipped.items():
                ui.print(f"[yellow]! skipping {n}: {why}[/]")

        def on_artifact(a: dict[str, Any]) -> None:
            if as_json:
                return
            color = {"pass": "green", "unverified": "yellow"}.get(a["status"], "red")
            ui.print(f"[{color}]{'✓' if a['status'] in ('pass', 'unverified') else '✗'}[/] {a['dir']}: {a['status']}"
                     + (f": {a['error']}" if a.get("error") else ""))

        res = pack(model, names, quantize.split(",") if quantize else None, out,
                   sign_key=sign_key, eval=eval_data, max_drop=max_drop, weights=weights, pretrained=pretrained,
                   progress=None if as_json else (lambda rel: progress_printer(ui, rel)), on_artifact=on_artifact)
    except EffaiError as e:
        fail(e, as_json)
    index = res.index
    if not as_json:
        for s in res.skipped:
            ui.print(f"[yellow]! {s['target']} {s['precision']} skipped: {s['reason']}[/]")
        ui.print(f"{'[green]✓' if res.status == 'complete' else '[bold red]✗'}[/] bundle {res.root} ({res.status}, "
                 f"{len(index['files'])} files{', signed' if index.get('signing') else ''})")
    arts = [{k: a[k] for k in ("target", "precision", "dir", "status", "error", "bytes")} for a in index["artifacts"]]
    summary = {"ok": res.status == "complete", "status": res.status, "bundle": str(res.root),
               "model": index["model"]["name"], "artifacts": arts, "skipped": res.skipped,
               "skipped_targets": skipped, "files": len(index["files"]), "signed": index.get("signing") is not None}
    if res.status != "complete":
        failed = "; ".join(f"{a['dir']}: {a['status']}" for a in arts if a["status"] not in ("pass", "unverified"))
        summary["error"], summary["exit_code"] = f"partial bundle ({failed})", 1
    console.json_line(summary)
    if res.status != "complete":
        raise typer.Exit(1)


COMMANDS = {"pack": pack_cmd, "keygen": keygen_cmd, "sign": sign_cmd, "verify": verify_cmd, "unpack": unpack_cmd,
            "install": install_cmd, "archive": archive_cmd}


bundle_app = typer.Typer(no_args_is_help=True, help="App bundles: pack a model for an app, sign, verify, install.")
for _name, _fn in COMMANDS.items():
    bundle_app.command(_name)(_fn)


def add_aliases(zoo_app: typer.Typer) -> None:
    """The old spellings `effai bundle pack|keygen|sign|verify|unpack|install|archive`, hidden, kept for one release."""
    for name, fn in COMMANDS.items():
        zoo_app.command(name, hidden=True)(fn)
