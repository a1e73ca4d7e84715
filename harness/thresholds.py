"""Gate thresholds are data (golden/thresholds.toml), checked against the metrics registry when loaded.

A threshold is keyed like a result row (schema.GATE_KEY), plus an optional `optimize` (the engine's speed-up switches,
the results' `optimize` label: a compiled cell sums differently from eager and is measured on its own) and an optional
`device` (a device kind, "cpu" or "cuda": GPU kernels sum in other orders than CPU ones, so a floor measured on one
kind may be too loose or too tight on the other; "cuda" matches the rows of every card, cuda:N), and an optional `size`
(the zoo size, "tiny" or "full": a floor measured on a 2-layer model of width 32 says nothing about a 57-layer one).
model/dtype/quant/parallel/optimize/device/size may be "*" (the last three are "*" when left out); a lookup takes the
most specific match, and two equally specific matches are an error rather than a silent pick. There is no default: a
gated metric without a threshold is the caller's error to report.
"""
from __future__ import annotations

import difflib
import math
import operator
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from harness.metrics import METRICS, metric_spec
from harness.schema import COMPARISONS, GATE_KEY

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "golden" / "thresholds.toml"
WILDCARD = "*"
WILDCARD_FIELDS = ("model", "dtype", "quant", "parallel")
OPS = {">=": operator.ge, "<=": operator.le}
REQUIRED = GATE_KEY + ("op", "value", "source")
OPTIONAL = ("note", "optimize", "device", "size")
DEVICE_KINDS = ("cpu", "cuda")  # what a rule's device may name: a kind, never one card (cuda:N)
ZOO_SIZES = ("tiny", "full")  # what a rule's size may name: every size of harness/zoo's families (a test checks)
PLACEHOLDER = "PLACEHOLDER"


class ThresholdError(ValueError):
    """The thresholds file is malformed, or a lookup is ambiguous. The gate turns this into exit 2."""


def expected_op(metric: str) -> str:
    """The only op that makes sense for a metric: absolute metrics gate |value| from above."""
    spec = metric_spec(metric)
    if spec.absolute:
        return "<="
    return ">=" if spec.higher_is_better else "<="


def format_key(key: tuple) -> str:
    """'<model>/fp32/none/sp1 engine_vs_reference psnr_db': how every message names a gate key."""
    return "/".join(str(k) for k in key[:4]) + " " + " ".join(str(k) for k in key[4:])


@dataclass(frozen=True)
class Threshold:
    model: str
    dtype: str
    quant: str
    parallel: str
    comparison: str
    metric: str
    op: str
    value: float
    source: str
    note: str = ""
    optimize: str = WILDCARD  # the engine switches' label ("eager", "compile_blocks"...) this floor was measured with
    device: str = WILDCARD  # the device kind ("cpu", "cuda") this floor was measured on; "*": any
    size: str = WILDCARD  # the zoo size ("tiny", "full") of the model this floor was measured on; "*": any
    index: int = 0  # 1-based position of the [[threshold]] table in the file, so messages can point at it

    @property
    def key(self) -> tuple:
        return tuple(getattr(self, f) for f in GATE_KEY)

    @property
    def specificity(self) -> int:
        return (sum(getattr(self, f) != WILDCARD for f in WILDCARD_FIELDS) + (self.optimize != WILDCARD)
                + (self.device != WILDCARD) + (self.size != WILDCARD))

    @property
    def placeholder(self) -> bool:
        return self.source.startswith(PLACEHOLDER)

    def label(self) -> str:
        switches = "" if self.optimize == WILDCARD else f" optimize={self.optimize}"
        switches += "" if self.device == WILDCARD else f" device={self.device}"
        switches += "" if self.size == WILDCARD else f" size={self.size}"
        return f"threshold #{self.index} ({format_key(self.key)}{switches})"

    def matches(self, key: tuple, optimize: str | None = None, device: str | None = None, size: str | None = None
                ) -> bool:
        """optimize, device, size: the row's label, device ("cpu", "cuda:1"...) and zoo size; None (results without
        the column) matches only rules for any optimize / any device / any size."""
        cell, comparison, metric = key[:4], key[4], key[5]
        if (self.comparison, self.metric) != (comparison, metric):
            return False
        if self.optimize != WILDCARD and self.optimize != optimize:
            return False
        if self.device != WILDCARD and (device is None or not _same_device(self.device, device)):
            return False
        if self.size != WILDCARD and self.size != size:
            return False
        return all(getattr(self, f) in (WILDCARD, v) for f, v in zip(WILDCARD_FIELDS, cell))

    def passes(self, value: float) -> bool:
        """Compare a finite value; absolute metrics compare |value| (a signed delta is bad either way)."""
        if metric_spec(self.metric).absolute:
            value = abs(value)
        return OPS[self.op](value, self.value)


@dataclass(frozen=True)
class ExactRule:
    """An exactness tier (a [[group]] with `exact = true`): on `device`, the engine was measured bitwise equal to
    what `comparison` compares it with, so every gated metric of the key with an identical-input value
    (MetricSpec.identical) must take exactly that value; any difference fails. On other devices, and for metrics
    without such a value (CLIP), the ordinary thresholds still judge."""

    model: str
    dtype: str
    quant: str
    parallel: str
    device: str
    optimize: str  # the engine's speed-up switches (results' `optimize` label): "eager" when none is on
    comparison: str
    source: str
    size: str = WILDCARD  # the zoo size it was measured on, as for Threshold; "*": any
    index: int = 0

    @property
    def specificity(self) -> int:
        return sum(getattr(self, f) != WILDCARD for f in WILDCARD_FIELDS) + (self.size != WILDCARD)

    def label(self) -> str:
        size = "" if self.size == WILDCARD else f" size={self.size}"
        return f"exact tier #{self.index} ({'/'.join((self.model, self.dtype, self.quant, self.parallel))} " \
               f"{self.device} {self.optimize} {self.comparison}{size})"

    def matches(self, cell: tuple, device: str, optimize: str, comparison: str, size: str | None = None) -> bool:
        return (self.comparison == comparison and _same_device(self.device, device) and self.optimize == optimize
                and self.size in (WILDCARD, size)
                and all(getattr(self, f) in (WILDCARD, v) for f, v in zip(WILDCARD_FIELDS, cell)))


def _same_device(rule: str, device: str) -> bool:
    """'cpu' matches 'cpu'; 'cuda' matches 'cuda' and 'cuda:N' (a device kind, not one card)."""
    return str(device).split(":")[0] == rule


@dataclass(frozen=True)
class Thresholds:
    rules: tuple[Threshold, ...]
    path: Path | None = field(default=None, compare=False)
    exact: tuple[ExactRule, ...] = ()

    def exact_rule(self, cell: tuple, device: str, optimize: str, comparison: str, size: str | None = None
                   ) -> ExactRule | None:
        """The exactness tier for a (model, dtype, quant, parallel) cell on `device` with the engine's `optimize`
        switches (and of zoo `size`), if one was measured."""
        matches = [r for r in self.exact if r.matches(cell, device, optimize, comparison, size)]
        if not matches:
            return None
        best = max(r.specificity for r in matches)
        top = [r for r in matches if r.specificity == best]
        if len(top) > 1:
            raise ThresholdError(f"{top[0].label()} and {top[1].label()} match equally specifically "
                                 f"({self.path or 'thresholds'})")
        return top[0]

    @cached_property
    def _by_comparison_metric(self) -> dict[tuple[str, str], list[Threshold]]:
        """The rules by (comparison, metric), in file order: a rule matches no key of another comparison or metric,
        and scanning every rule for every key cost seconds per gate."""
        index: dict[tuple[str, str], list[Threshold]] = {}
        for t in self.rules:
            index.setdefault((t.comparison, t.metric), []).append(t)
        return index

    @property
    def keyed_by_optimize(self) -> bool:
        return any(t.optimize != WILDCARD for t in self.rules)

    @property
    def keyed_by_device(self) -> bool:
        return any(t.device != WILDCARD for t in self.rules)

    @property
    def keyed_by_size(self) -> bool:
        return any(t.size != WILDCARD for t in self.rules)

    def lookup(self, key: tuple, optimize: str | None = None, device: str | None = None, size: str | None = None
               ) -> Threshold | None:
        """The most specific rule for a GATE_KEY-ordered key, the row's optimize label, its device and its zoo size,
        None if none matches; raises on a tie."""
        matches = [t for t in self._by_comparison_metric.get((key[4], key[5]), ())
                   if t.matches(key, optimize, device, size)]
        if not matches:
            return None
        best = max(t.specificity for t in matches)
        top = [t for t in matches if t.specificity == best]
        if len(top) > 1:
            raise ThresholdError(
                f"{format_key(key)}: {top[0].label()} and {top[1].label()} match equally specifically; "
                f"make one of them more specific or remove one ({self.path or 'thresholds'})"
            )
        return top[0]


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    path = Path(path) if path is not None else DEFAULT_PATH
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ThresholdError(f"{path}: thresholds file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ThresholdError(f"{path}: cannot read thresholds: {e}") from None
    return parse_thresholds(data, path)


def parse_thresholds(data: dict, path: Path | None = None) -> Thresholds:
    """Validate every row and report all problems at once, so one edit fixes the file."""
    where = str(path or "thresholds")
    extra = sorted(set(data) - {"threshold", "group"})
    if extra:
        raise ThresholdError(f"{where}: unknown top-level key(s) {extra}; only [[threshold]] and [[group]] tables")
    groups = list(data.get("group", []))
    exact_groups = [g for g in groups if isinstance(g, dict) and "exact" in g]
    try:
        rows = list(data.get("threshold", [])) + [r for g in groups if g not in exact_groups
                                                  for r in expand_group(g)]
    except ThresholdError as e:
        raise ThresholdError(f"{where}: {e}") from None
    exact, exact_problems = _exact_rules(exact_groups)
    if exact_problems:
        raise ThresholdError(f"{where}: {len(exact_problems)} problem(s):\n  - " + "\n  - ".join(exact_problems))
    if not rows:
        raise ThresholdError(f"{where}: no [[threshold]] or [[group]] tables")

    problems: list[str] = []
    rules: list[Threshold] = []
    seen: dict[tuple, Threshold] = {}
    for i, row in enumerate(rows, start=1):
        row_problems = _check_row(row)
        if row_problems:
            problems += [f"threshold #{i}: {p}" for p in row_problems]
            continue
        fields = {k: row[k] for k in REQUIRED + OPTIONAL if k in row}
        rule = Threshold(**{**fields, "value": float(fields["value"])}, index=i)  # TOML ints become floats
        ident = (rule.key, rule.optimize, rule.device, rule.size)
        if ident in seen:
            problems.append(f"{rule.label()}: duplicate of {seen[ident].label()}")
            continue
        seen[ident] = rule
        rules.append(rule)
    if problems:
        raise ThresholdError(f"{where}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return Thresholds(tuple(rules), path, exact)


EXACT_FIELDS = WILDCARD_FIELDS + ("device", "optimize", "comparison", "source")


def _exact_rules(groups: list[dict]) -> tuple[tuple[ExactRule, ...], list[str]]:
    """[[group]] tables with `exact = true`: a key, a device and a source; no values (the identical-input value of
    each metric is the threshold)."""
    rules, problems, seen = [], [], {}
    for i, g in enumerate(groups, start=1):
        where = f"exact group #{i}"
        if g.get("exact") is not True:
            problems.append(f"{where}: exact must be true (a group without exactness leaves the key out), "
                            f"got {g.get('exact')!r}")
            continue
        if any(k in g for k in GROUP_OPS):
            problems.append(f"{where}: an exact group takes no {list(GROUP_OPS)}: every metric must equal its "
                            f"identical-input value (harness/metrics.py MetricSpec.identical)")
        unknown = sorted(set(g) - set(EXACT_FIELDS) - {"exact", "size"})
        missing = [k for k in EXACT_FIELDS if k not in g]
        if unknown:
            problems.append(f"{where}: unknown field(s) {unknown}; valid: {list(EXACT_FIELDS) + ['exact', 'size']}")
        if missing:
            problems.append(f"{where}: missing field(s) {missing} (an exactness measurement holds on one device "
                            f"kind with one set of engine switches, and says where it was measured)")
        bad = [k for k in EXACT_FIELDS if k in g and not (isinstance(g[k], str) and g[k].strip())]
        if bad:
            problems.append(f"{where}: {bad} must be non-empty strings")
        if unknown or missing or bad:
            continue
        if g["comparison"] not in COMPARISONS:
            problems.append(f"{where}: unknown comparison {g['comparison']!r}; valid: {list(COMPARISONS)}")
            continue
        if g["device"] not in DEVICE_KINDS:
            problems.append(f"{where}: device must be one device kind, one of {list(DEVICE_KINDS)}, "
                            f"got {g['device']!r}")
            continue
        if g.get("size", WILDCARD) not in (WILDCARD,) + ZOO_SIZES:
            problems.append(f"{where}: size must be a zoo size, one of {[WILDCARD, *ZOO_SIZES]}, got {g['size']!r}")
            continue
        rule = ExactRule(**{k: g[k] for k in EXACT_FIELDS}, size=g.get("size", WILDCARD), index=i)
        key = tuple(getattr(rule, k) for k in EXACT_FIELDS[:-1]) + (rule.size,)
        if key in seen:
            problems.append(f"{rule.label()}: duplicate of {seen[key].label()}")
            continue
        seen[key] = rule
        rules.append(rule)
    return tuple(rules), problems


GROUP_OPS = {"at_least": ">=", "at_most": "<="}


def expand_group(group) -> list[dict]:
    """A [[group]] shares one key prefix and one source across several metrics, with the direction spelled out:
    `at_least = {metric = value, ...}` (op ">=") and `at_most = {...}` (op "<="). It expands to plain rows, which
    are validated like any [[threshold]]."""
    if not isinstance(group, dict):
        raise ThresholdError(f"[[group]] must be a table, got {type(group).__name__}")
    shared = {k: v for k, v in group.items() if k not in GROUP_OPS}
    if not any(k in group for k in GROUP_OPS):
        raise ThresholdError(f"[[group]] {shared} has neither at_least nor at_most")
    rows = []
    for key, op in GROUP_OPS.items():
        metrics = group.get(key, {})
        if not isinstance(metrics, dict):
            raise ThresholdError(f"[[group]] {key} must be a table of metric = value, got {metrics!r}")
        rows += [{**shared, "metric": m, "op": op, "value": v} for m, v in metrics.items()]
    return rows


def _check_row(row) -> list[str]:
    if not isinstance(row, dict):
        return [f"expected a table, got {type(row).__name__}"]
    problems = []
    unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        problems.append(f"unknown field(s) {unknown}; valid: {list(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        hint = " (say where the number comes from)" if "source" in missing else ""
        problems.append(f"missing field(s) {missing}{hint}")
    for k in GATE_KEY + ("op", "source") + OPTIONAL:
        if k in row and not (isinstance(row[k], str) and (row[k].strip() or k == "note")):
            problems.append(f"{k} must be a non-empty string, got {row[k]!r}")
    if problems:
        return problems  # the checks below assume well-typed fields

    metric, comparison, op, value = row["metric"], row["comparison"], row["op"], row["value"]
    if comparison not in COMPARISONS:
        problems.append(f"unknown comparison {comparison!r}; valid: {list(COMPARISONS)}")
    if "device" in row and row["device"] not in (WILDCARD,) + DEVICE_KINDS:
        problems.append(f"device must be a device kind, one of {[WILDCARD, *DEVICE_KINDS]} ('cuda' matches every "
                        f"card), got {row['device']!r}")
    if "size" in row and row["size"] not in (WILDCARD,) + ZOO_SIZES:
        problems.append(f"size must be a zoo size, one of {[WILDCARD, *ZOO_SIZES]}, got {row['size']!r}")
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown metric {metric!r}{hint}; valid: {sorted(METRICS)}")
    elif not metric_spec(metric).gated:
        problems.append(f"metric {metric!r} is not gated, so this threshold would never be checked")
    if op not in OPS:
        problems.append(f"op must be one of {list(OPS)}, got {op!r}")
    elif metric in METRICS and op != expected_op(metric):
        spec = metric_spec(metric)
        why = "absolute (|value| is gated)" if spec.absolute else (
            "higher is better" if spec.higher_is_better else "lower is better")
        problems.append(f"op {op!r} disagrees with {metric!r}, which is {why}: use {expected_op(metric)!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append(f"value must be a finite number, got {value!r}")
    return problems
