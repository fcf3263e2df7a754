"""Tables and help that fit an 80-column terminal (issue 20): `effai zoo list` keeps whole values in the columns it
shows (no one-character columns), `effai export --help` shows every target's full precision list."""

from __future__ import annotations

import re

from tests.helpers import run_cli

NARROW = {"COLUMNS": "80"}


def test_zoo_list_at_80_columns_keeps_names_and_values_whole():
    from effai.zoo import CARDS

    code, last, stdout, err = run_cli("zoo", "list", env=NARROW)
    assert code == 0, err
    table = [ln for ln in stdout.splitlines() if not ln.startswith("{")]
    assert max(len(ln) for ln in table) <= 80
    cells = [[c.strip() for c in ln.strip("│ ").split("│")] for ln in table if ln.startswith("│")]
    assert cells, stdout
    names = [row[0] for row in cells]
    assert names == list(CARDS.names()), "one line per card, each name whole in the first column"
    header = next(ln for ln in table if ln.startswith("┃"))
    assert "params" in header and "MACs" in header and "input" in header
    for row in cells:
        assert all(len(c) >= 2 or c == "-" for c in row), row     # no one-character fragments
    assert re.search(r"\d+\.\d+ M", " ".join(r[1] for r in cells))
    assert "hidden at this width" in stdout and "--json" in stdout
    assert {m["name"] for m in last["models"]} == set(CARDS.names())   # every column is still in --json


def test_export_help_at_80_columns_shows_every_precision_list_whole():
    from effai.export.targets import TARGETS

    code, _, stdout, err = run_cli("export", "--help", env=NARROW)
    assert code == 0, err
    lines = stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert "…" not in stdout, "no option help is cut with an ellipsis"
    start = next(i for i, ln in enumerate(lines) if "Precision:" in ln)
    col = lines[start].index("Precision:")
    text = []
    for ln in lines[start:]:
        if text and ln[:col].strip("│ ") and not ln[:col].strip("│ ").startswith("-q"):
            break                                              # the next option begins
        text.append(ln[col:].rstrip("│ "))
    joined = " ".join(" ".join(text).split())
    for name, target in TARGETS.items():
        assert f"{name}: " + " | ".join(target.precisions) in joined, (name, joined)


def test_bench_table_at_80_columns_hides_low_priority_columns_and_says_so(digits_exports, tmp_path):
    from rich.console import Console

    from effai.device_bench import report

    out = tmp_path / "bench.json"
    dirs = [str(digits_exports[t].out_dir) for t in ("tflite", "onnx")]     # runtimes that load without torch
    code, last, stdout, err = run_cli("bench", *dirs, "--threads", "1,2", "--runs", "2", "--warmup", "0",
                                      "--cooldown", "0", "--idle", "0", "--energy", "none", "--out", str(out),
                                      env=NARROW)
    assert code == 0, err
    table = [ln for ln in stdout.splitlines() if not ln.startswith("{")]
    assert max(len(ln) for ln in table) <= 80, "\n".join(table)
    rows = [[c.strip() for c in ln.strip("│ ").split("│")] for ln in table if ln.startswith("│")]
    assert len(rows) == 4, stdout                       # one line per artifact x threads: no cell folded
    for t in ("tflite", "onnx"):
        assert sum(r[0] == f"ghostnetv3_050.digits {t} fp32" for r in rows) == 2, rows   # artifact names whole
    header = next(ln for ln in table if ln.startswith("┃"))
    assert "median ms" in header and "thr" in header
    caption = " ".join(" ".join(table[table.index(next(ln for ln in table if ln.startswith("└"))) + 1:]).split())
    m = re.search(r"hidden at this width: ([a-z0-9 ,]+) \(all in the JSON report\)", caption)
    assert m, caption
    hidden = m.group(1).split(", ")
    assert hidden and all(h not in header for h in hidden), (hidden, header)
    assert all(r["median_ms"] > 0 and r["p90_ms"] for r in last["records"])     # --json keeps every field
    _, records = report.load(out)                       # wide: every column shown, nothing hidden
    wide = Console(width=200, record=True, file=open(__import__("os").devnull, "w"))
    wide.print(report.table(records, width=200))
    text = wide.export_text()
    assert "hidden at this width" not in text and all(h in text for h in hidden), text


def test_export_table_at_80_columns_keeps_every_cell_whole_and_lists_the_files(digits_exports):
    """`effai export --target all`'s results table: one line per artifact at 80 columns (nothing folds); the files
    move under the table when their column does not fit, and a parity not run says why there."""
    import os

    from rich.console import Console

    from effai.cli.export import _row, export_table

    rows = [_row(res) for res in digits_exports.values()]
    rows.append({"target": "coreml", "error": "coremltools failed", "exit_code": 1})   # a target that failed

    def render(width: int) -> tuple[list[str], list[str]]:
        con = Console(width=width, record=True, file=open(os.devnull, "w"))
        table, notes = export_table(rows, width)
        con.print(table)
        for line in notes:
            con.print(line, highlight=False)
        return con.export_text().splitlines(), notes

    lines, notes = render(80)
    assert max(len(ln) for ln in lines) <= 80, "\n".join(lines)
    cells = [[c.strip() for c in ln.strip("│ ").split("│")] for ln in lines if ln.startswith("│")]
    assert len(cells) == len(rows), "\n".join(lines)           # one line per artifact: no cell folded
    header = next(ln for ln in lines if ln.startswith("┃"))
    for col in ("target", "precision", "MB", "parity", "top-1"):
        assert col in header, header
    assert "file" not in header
    for r, row in zip(rows, cells):
        assert row[0] == r["target"]
        if "file" in r:
            assert row[1] == r["precision"] and row[2] == f"{r['mb']:.2f}" and row[3].startswith(r["parity"])
            assert f"{r['target']} {r['precision']}: {r['file']}" in notes     # every file listed, whole
        else:
            assert row[3] == "error"
    for r in rows:
        if r.get("parity") == "not-run":         # e.g. Core ML on Linux: the reason is under the table
            assert any(n.startswith(f"{r['target']} {r['precision']}: parity not run: ") for n in notes), notes
    wide, wide_notes = render(250)
    header = next(ln for ln in wide if ln.startswith("┃"))
    assert "file" in header and not any(": " + r.get("file", "?") in n for r in rows for n in wide_notes)
    assert all(r["file"] in "\n".join(wide) for r in rows if "file" in r)
