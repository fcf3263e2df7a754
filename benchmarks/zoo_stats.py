"""`effai zoo list`'s params/MACs: the real-tensor count (the baseline) vs the meta-device count vs the user cache.

    python benchmarks/zoo_stats.py                 # 3 rounds, results/zoo_stats.json
    python benchmarks/zoo_stats.py --rounds 1      # quick look

Per round and card, in alternating order: the baseline (random-init build, then effai.export.stats.model_stats with
meta=False: folds and a forward on real tensors, what `zoo list` did on a cold cache before), the new cold path
(stats._measure: built and counted on the meta device, real tensors only where a card needs them) and a warm cache
read. Both counts must agree. Then the command itself in fresh processes: `effai zoo list --json` on an empty cache
(cold) and on the cache that run wrote (warm), and `effai --version` (the CLI's start-up). Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effai import zoo  # noqa: E402
from effai.export import stats  # noqa: E402
from effai.export.quiet import runtime_quiet  # noqa: E402
from effai.files import atomic_write  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def cli_seconds(args: list[str], cache: Path) -> float:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "effai", *args], env=env, capture_output=True, text=True)
    s = time.perf_counter() - t
    if proc.returncode != 0:   # said and left out of the medians (a card broken in this checkout fails the list)
        print(f"effai {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}", flush=True)
        return float("nan")
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo_stats.json"))
    args = ap.parse_args()
    names = list(zoo.CARDS.names())
    per_card: dict[str, dict[str, list[float]]] = {n: {"baseline": [], "meta": [], "warm": []} for n in names}
    totals: dict[str, list[float]] = {"baseline": [], "meta": [], "warm": [], "cli_cold": [], "cli_warm": [],
                                      "cli_version": []}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "inproc")
        for r in range(args.rounds):
            for key in ("baseline", "meta", "warm"):
                totals[key].append(0.0)
            for i, name in enumerate(names):
                card = zoo.CARDS.get(name)
                order = ("baseline", "meta") if (i + r) % 2 == 0 else ("meta", "baseline")
                got = {}
                try:
                    for kind in order:
                        with runtime_quiet():
                            if kind == "baseline":
                                s, got[kind] = timed(lambda: stats.model_stats(zoo.build(card),
                                                                               tuple(card.input_size), inplace=True,
                                                                               meta=False))
                            else:
                                s, got[kind] = timed(lambda: stats._measure(card))
                        per_card[name][kind].append(s)
                        totals[kind][-1] += s
                except Exception as e:   # noqa: BLE001 - a card that does not build here is left out, said so
                    skipped[name] = f"{type(e).__name__}: {e}"[:300]
                    print(f"skipped {name}: {skipped[name]}", flush=True)
                    continue
                assert got["baseline"] == got["meta"], (name, got)
                stats.clear_memo()
                stats.card_stats(name)          # writes the cache entry (not timed)
                stats.clear_memo()
                s, warm = timed(lambda: stats.card_stats(name))
                assert warm == got["meta"], (name, warm, got)
                per_card[name]["warm"].append(s)
                totals["warm"][-1] += s
            cache = Path(tmp) / f"cli{r}"
            totals["cli_cold"].append(cli_seconds(["zoo", "list", "--json"], cache))
            totals["cli_warm"].append(cli_seconds(["zoo", "list", "--json"], cache))
            totals["cli_version"].append(cli_seconds(["--version"], cache))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in totals.items()), flush=True)
    med = {k: statistics.median([x for x in v if x == x] or [float("nan")]) for k, v in totals.items()}
    result = {
        "command": "python benchmarks/zoo_stats.py --rounds %d" % args.rounds,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores (shared)",
        "load_average_at_end": list(os.getloadavg()),
        "cards": len(names) - len(skipped), "skipped_cards": skipped, "rounds": args.rounds, "median_s": med, "all_s": totals,
        "ratio_baseline_over_meta": med["baseline"] / med["meta"],
        "ratio_baseline_over_warm": med["baseline"] / med["warm"],
        "per_card_median_s": {n: {k: statistics.median(v) for k, v in d.items()} for n, d in per_card.items()
                              if n not in skipped},
    }
    atomic_write(Path(args.out), json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{result['cards']} cards (skipped: {', '.join(skipped) or 'none'}), median of {args.rounds}: baseline (real tensors) {med['baseline']:.2f} s, "
          f"meta {med['meta']:.2f} s ({result['ratio_baseline_over_meta']:.1f}x), warm cache {med['warm']:.3f} s "
          f"({result['ratio_baseline_over_warm']:.0f}x); effai zoo list: cold {med['cli_cold']:.2f} s, warm "
          f"{med['cli_warm']:.2f} s, effai --version {med['cli_version']:.2f} s")


if __name__ == "__main__":
    main()
