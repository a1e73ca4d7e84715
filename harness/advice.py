"""Reading a stored ignore-list advice (advice.json, written by `parity sensitivity`): a suite cell's
`quant_ignored_from`. Kept apart from harness.sensitivity so that suites can read advice without the tool."""
from __future__ import annotations

import json
from pathlib import Path


def load_advice(path: str | Path, quant: str) -> tuple[str, ...]:
    """The ignored-layer patterns of an advice.json, for a cell quantized with `quant` (the advice's own mode)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"quant_ignored_from: {path} does not exist")
    advice = json.loads(path.read_text())
    if advice.get("quant") != quant:
        raise ValueError(f"quant_ignored_from: {path} advises quant mode {advice.get('quant')!r}, the cell runs {quant!r}")
    if not isinstance(advice.get("ignored"), list) or not all(isinstance(p, str) for p in advice["ignored"]):
        raise ValueError(f"quant_ignored_from: {path} has no list of ignored patterns")
    return tuple(advice["ignored"])
