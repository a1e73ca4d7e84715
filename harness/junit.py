"""JUnit XML for CI systems: one <testcase> per cell (classname = the cell, name = its comparisons), whose
<failure> message lists the cell's failing rows and baseline regressions; gate errors (no threshold, unreadable
files) are one <error> testcase of their own, so a CI page never shows green when the gate could not decide."""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from harness import tables
from harness.gate import GateResult
from harness.runfiles import atomic_write, cell_label, fmt

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
# XML 1.0 forbids most control characters; a crash reason may hold any (terminal colours, NUL).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def junit_xml(result: GateResult, suite: str = "parity") -> str:
    metrics = tables.per_metric(result.rows)
    failed = result.failed.assign(cell=cell_label(result.failed)) if len(result.failed) else None
    regressed = result.regressed
    cases = []
    for cell, grp in metrics.groupby("cell", sort=True):
        case = ET.Element("testcase", classname=f"{suite}.{cell}", name=", ".join(sorted(set(grp["comparison"]))))
        lines = []
        if failed is not None:
            for _, r in failed[failed["cell"] == cell].iterrows():
                where = " ".join(f"{c} {fmt(r[c])}" for c in ("prompt_idx", "seed", "step") if c in r and pd.notna(r[c]))
                lines.append(f"{r['comparison']} {r['metric']} {where}: {r['why']}")
        for _, r in regressed[regressed["cell"] == cell].iterrows():
            lines.append(f"regression {r['comparison']} {r['metric']} prompt_idx {fmt(r['prompt_idx'])} "
                         f"seed {fmt(r['seed'])}: {r['why']}")
        if lines:
            failure = ET.SubElement(case, "failure", message=_x(f"{len(lines)} failing row(s): {lines[0]}"),
                                    type="GateFailure")
            failure.text = _x("\n".join(lines))
        else:
            closest = tables.per_cell(grp).closest.iloc[0]
            ET.SubElement(case, "system-out").text = _x("closest: " + tables.describe_closest(closest))
        cases.append(case)
    if result.errors:
        case = ET.Element("testcase", classname=f"{suite}.gate", name="gate decision")
        ET.SubElement(case, "error", message=_x(result.errors[0][:500]), type="GateError").text = _x(
            "\n".join(result.errors))
        cases.append(case)
    n_fail = sum(c.find("failure") is not None for c in cases)
    n_err = sum(c.find("error") is not None for c in cases)
    root = ET.Element("testsuites", name="parity gate", tests=str(len(cases)), failures=str(n_fail),
                      errors=str(n_err))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(n_fail),
                       errors=str(n_err), skipped="0")
    ts.extend(cases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: str | Path, result: GateResult, suite: str = "parity") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = junit_xml(result, suite)
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path


def append_step_summary(markdown: str) -> bool:
    """Append to $GITHUB_STEP_SUMMARY when a CI runner set it; False when it is not set."""
    target = os.environ.get(STEP_SUMMARY_ENV)
    if not target:
        return False
    with open(target, "a") as f:
        f.write(markdown.rstrip("\n") + "\n\n")
    return True
