"""The regression gate: `--baseline FILE --fail-on latency:+5%,energy:+5%` compares this run with an earlier report.

Records match by BenchRecord.key() (the last one wins); `METRIC:+N%` fails above +N percent, except a latency change
whose 95% quantile intervals [x_(r), x_(s)], r, s = ceil(n*q -/+ 1.96*sqrt(n*q*(1-q))), still overlap: "within
noise". A rule ending in "!" is strict. The policy: docs/bench.md, "Regression gate".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from effai.device_bench.base import BenchRecord
from effai.errors import UsageError

DEFAULT_FAIL_ON = "latency:+5%,energy:+5%"
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Metric:
    """One comparable figure of a BenchRecord."""

    name: str
    what: str                 # words in the diff
    unit: str                 # ms | J
    quantile: float | None = None   # latency metrics: which quantile of samples_ms (gives the noise interval)
    stat: str = ""            # key in BenchRecord.stats


METRICS: dict[str, Metric] = {
    "latency": Metric("latency", "latency", "ms", 0.5, "median"),
    "p90": Metric("p90", "p90", "ms", 0.9, "p90"),
    "p99": Metric("p99", "p99", "ms", 0.99, "p99"),
    "energy": Metric("energy", "energy", "J"),
    "first": Metric("first", "first inference", "ms"),
    "load": Metric("load", "load", "ms"),
}

_RULE_RE = re.compile(r"(?P<metric>[a-z0-9]+):\+?(?P<pct>\d+(?:\.\d+)?)%(?P<strict>!?)")
_SYNTAX = ("write --fail-on as METRIC:+N% rules separated by commas, e.g. latency:+5%,energy:+5%,p90:+10% "
           f"(a trailing ! makes a rule ignore noise: latency:+5%!); metrics: {', '.join(METRICS)}")


@dataclass(frozen=True)
class Rule:
    """Fail when `metric` rose by more than `threshold_pct` percent; `strict` ignores the noise interval."""

    metric: str
    threshold_pct: float
    strict: bool = False

    def __str__(self) -> str:
        return f"{self.metric}:+{self.threshold_pct:g}%{'!' if self.strict else ''}"


def parse_fail_on(text: str) -> tuple[Rule, ...]:
    """'latency:+5%,energy:+5%,p90:+10%,first:+20%,load:+50%' -> rules. UsageError naming the bad part, the
    metrics and the syntax for anything else (unknown metric, missing %, negative or repeated rule)."""
    parts = [p.strip() for p in str(text or "").split(",")]
    if not any(parts):
        raise UsageError(f"--fail-on is empty; {_SYNTAX}")
    rules: list[Rule] = []
    for part in parts:
        if not part:
            raise UsageError(f"--fail-on '{text}' has an empty rule; {_SYNTAX}")
        m = _RULE_RE.fullmatch(part.replace(" ", "").lower())
        if not m:
            raise UsageError(f"bad --fail-on rule '{part}'; {_SYNTAX}")
        name = m.group("metric")
        if name not in METRICS:
            raise UsageError(f"unknown --fail-on metric '{name}' in '{part}'; {_SYNTAX}")
        if any(r.metric == name for r in rules):
            raise UsageError(f"--fail-on names '{name}' twice; keep one rule per metric")
        rules.append(Rule(name, float(m.group("pct")), bool(m.group("strict"))))
    return tuple(rules)


# ------------------------------------------------------------------------------------------------ per-record figures

def quantile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of already-sorted values."""
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def quantile_interval(samples: list[float], q: float) -> tuple[float, float] | None:
    """95% distribution-free confidence interval of the q-quantile from order statistics; None with < 5 samples."""
    xs = sorted(x for x in samples if isinstance(x, (int, float)) and math.isfinite(x))
    n = len(xs)
    if n < 5:
        return None
    half = Z95 * math.sqrt(n * q * (1 - q))
    j = max(0, math.ceil(n * q - half) - 1)        # order statistics r = ceil(nq - h), s = ceil(nq + h), 1-based
    k = min(n - 1, math.ceil(n * q + half) - 1)    # -> 0-based indices, clamped to the sample
    return xs[j], xs[k]


def spread(samples: list[float]) -> float | None:
    """p90 - p10 of the samples: how wide the latency distribution is (shown in the diff, not used to gate)."""
    xs = sorted(x for x in samples if isinstance(x, (int, float)) and math.isfinite(x))
    return quantile(xs, 0.9) - quantile(xs, 0.1) if len(xs) >= 2 else None


def metric_value(rec: BenchRecord, metric: Metric) -> tuple[float | None, str]:
    """(value, "") or (None, why it is missing) for one record."""
    if rec.status != "ok":
        return None, f"run failed: {rec.error or rec.status}"
    if metric.name == "energy":
        e = rec.energy or {}
        j = e.get("joules_per_inference")
        if not e.get("available") or j is None:
            reason = e.get("reason") or "no meter"
            return None, reason if str(reason).startswith("unavailable") else f"unavailable: {reason}"
        return float(j), ""
    if metric.name in ("first", "load"):
        v = rec.first_ms if metric.name == "first" else rec.load_ms
        ok = isinstance(v, (int, float)) and math.isfinite(v) and v > 0
        return (float(v), "") if ok else (None, f"no {metric.what} time recorded")
    v = (rec.stats or {}).get(metric.stat)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v), ""
    xs = sorted(x for x in rec.samples_ms if isinstance(x, (int, float)) and math.isfinite(x))
    return (quantile(xs, metric.quantile or 0.5), "") if xs else (None, "no samples")


# ---------------------------------------------------------------------------------------------------- comparison

def label_of(key: tuple[str, str, str, str, int]) -> str:
    model, target, precision, device, threads = key
    return f"{model} {target} {precision} @ {device} x{threads}"


def fmt_value(v: float, unit: str) -> str:
    if unit == "J":
        return f"{v * 1e3:.4g} mJ" if abs(v) < 1 else f"{v:.4g} J"
    return f"{v:.3g}" if abs(v) < 0.1 else f"{v:.2f}"


def _short(text: str, width: int) -> str:
    """Keep the end of the note ("(both runs)") while shortening a long meter reason in the middle."""
    if len(text) <= width:
        return text
    tail = " (both runs)" if text.endswith(" (both runs)") else ""
    return text[: width - len(tail) - 1].rstrip() + "…" + tail


def _unit_suffix(unit: str) -> str:
    return " ms" if unit == "ms" else "/inf"


@dataclass(frozen=True)
class Row:
    """One line of the diff: a metric of a matched record, or a record only on one side / a failed run.

    verdict: regression | within-noise | ok | improved | not-compared | failed | new | missing."""

    key: tuple[str, str, str, str, int]
    verdict: str
    metric: str = ""
    baseline: float | None = None
    current: float | None = None
    change_pct: float | None = None
    threshold_pct: float | None = None
    note: str = ""

    @property
    def fails(self) -> bool:
        return self.verdict in ("regression", "failed")

    def line(self) -> str:
        head = f"{label_of(self.key)}:"
        if self.verdict == "new":
            return f"{head} new (not in the baseline)"
        if self.verdict == "missing":
            return f"{head} missing (in the baseline, not in this run)"
        if self.verdict == "failed":
            return f"{head} FAILED ({self.note})"
        m = METRICS[self.metric]
        if self.verdict == "not-compared":   # meters explain at length; the table/CLI print the full reason
            return f"{head} {m.what} not compared: {_short(self.note, 110)}"
        unit = _unit_suffix(m.unit)
        vals = f"{fmt_value(self.baseline, m.unit)} -> {fmt_value(self.current, m.unit)}{unit}"
        cmp = ">" if self.change_pct > self.threshold_pct else "<="
        text = f"{head} {m.what} {vals} ({self.change_pct:+.1f}% {cmp} +{self.threshold_pct:g}%)"
        text += {"regression": " REGRESSION", "within-noise": " ok, within noise", "ok": " ok",
                 "improved": " improved"}[self.verdict]
        return f"{text}; {self.note}" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        return {"key": list(self.key), "label": label_of(self.key), "verdict": self.verdict, "metric": self.metric,
                "baseline": self.baseline, "current": self.current, "change_pct": self.change_pct,
                "threshold_pct": self.threshold_pct, "note": self.note}


@dataclass
class Comparison:
    """Result of compare(): every row, the failing ones, and a readable diff."""

    rules: tuple[Rule, ...]
    rows: list[Row] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.fails]

    @property
    def ok(self) -> bool:
        return not self.regressions

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.verdict] = out.get(r.verdict, 0) + 1
        return out

    def summary(self) -> str:
        c = self.counts()
        compared = sum(c.get(v, 0) for v in ("regression", "within-noise", "ok", "improved"))
        n = len(self.regressions)
        head = "no regressions" if n == 0 else f"{n} regression{'s' if n != 1 else ''}"
        return (f"{head} against the baseline ({compared} comparisons with {', '.join(map(str, self.rules))}; "
                f"{c.get('within-noise', 0)} within noise, {c.get('not-compared', 0)} not compared, "
                f"{c.get('new', 0)} new, {c.get('missing', 0)} missing)")

    def render(self) -> str:
        """The diff: one line per row, grouped by record in key order, then a summary line."""
        return "\n".join([r.line() for r in self.rows] + [self.summary()])

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rules": [str(r) for r in self.rules], "summary": self.summary(),
                "regressions": [r.to_dict() for r in self.regressions], "rows": [r.to_dict() for r in self.rows]}


def _by_key(records: list[BenchRecord]) -> dict[tuple, BenchRecord]:
    out: dict[tuple, BenchRecord] = {}
    for rec in records:
        out[rec.key()] = rec   # the last of repeated keys wins (appended reports)
    return out


def _compare_metric(key: tuple, rule: Rule, cur: BenchRecord, base: BenchRecord) -> Row:
    m = METRICS[rule.metric]
    b, b_why = metric_value(base, m)
    c, c_why = metric_value(cur, m)
    if b is None or c is None:
        if b is None and c is None:
            note = f"{b_why} (both runs)" if b_why == c_why else f"baseline: {b_why}; current: {c_why}"
        else:
            note = f"baseline: {b_why}" if b is None else f"current: {c_why}"
        return Row(key, "not-compared", rule.metric, b, c, note=note)
    if b <= 0:
        return Row(key, "not-compared", rule.metric, b, c, note=f"baseline value {b:g} is not positive")
    change = (c - b) / b * 100.0
    notes = []
    if m.quantile is not None:
        sb, sc = spread(base.samples_ms), spread(cur.samples_ms)
        if sb is not None and sc is not None:
            notes.append(f"spread p90-p10 {fmt_value(sb, 'ms')} -> {fmt_value(sc, 'ms')} ms")
    if change > rule.threshold_pct:
        verdict = "regression"
        if m.quantile is not None and not rule.strict:
            ib, ic = quantile_interval(base.samples_ms, m.quantile), quantile_interval(cur.samples_ms, m.quantile)
            if ib is not None and ic is not None and ib[1] >= ic[0]:
                verdict = "within-noise"
                notes.append(f"95% intervals overlap: [{fmt_value(ib[0], 'ms')}, {fmt_value(ib[1], 'ms')}] vs "
                             f"[{fmt_value(ic[0], 'ms')}, {fmt_value(ic[1], 'ms')}] ms; more --runs or "
                             f"{rule}! to gate strictly")
    elif change < -rule.threshold_pct:
        verdict = "improved"
    else:
        verdict = "ok"
    return Row(key, verdict, rule.metric, b, c, change, rule.threshold_pct, "; ".join(notes))


def compare(current: list[BenchRecord], baseline: list[BenchRecord], rules: tuple[Rule, ...]) -> Comparison:
    """Match current and baseline records by key() and apply every rule to every matched pair (module docstring
    has the noise policy). Rows come in key order: matched records rule by rule, then new, then missing."""
    if not rules:
        raise UsageError(f"no --fail-on rules to compare with the baseline; {_SYNTAX}")
    cur, base = _by_key(current), _by_key(baseline)
    out = Comparison(tuple(rules))
    for key in sorted(cur, key=lambda k: tuple(map(str, k[:4])) + (k[4],)):
        c = cur[key]
        if key not in base:
            out.rows.append(Row(key, "new"))
        elif c.status == "skipped":
            out.rows.append(Row(key, "not-compared", note=f"skipped here: {c.error}"))
        elif c.status != "ok":
            out.rows.append(Row(key, "failed", note=f"this run failed: {c.error or c.status}"))
        else:
            out.rows.extend(_compare_metric(key, rule, c, base[key]) for rule in rules)
    for key in sorted(set(base) - set(cur), key=lambda k: tuple(map(str, k[:4])) + (k[4],)):
        out.rows.append(Row(key, "missing"))
    return out
