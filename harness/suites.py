"""Suites are data: a TOML file lists prompts, seeds, sampling defaults and a matrix of cells
(model x dtype x quant x parallel x device). This module turns one into a list of frozen Cells."""
from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

SUITES_DIR = Path(__file__).with_name("suites")
AXES = ("model", "dtype", "quant", "parallel", "device", "size")
SAMPLING = ("steps", "height", "width", "guidance", "true_cfg_scale", "negative_prompt", "max_sequence_length")


class SuiteError(ValueError):
    pass


@dataclass(frozen=True)
class Cell:
    model: str
    dtype: str
    quant: str
    parallel: str
    device: str
    size: str
    steps: int
    height: int
    width: int
    guidance: float
    true_cfg_scale: float
    max_sequence_length: int
    negative_prompt: str | None = None
    golden: bool = True

    @property
    def name(self) -> str:
        return "/".join([self.model, self.size, self.dtype, self.quant, self.parallel, self.device])


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    cells: tuple[Cell, ...]
    path: Path

    def with_device(self, device: str) -> "Suite":
        return replace(self, cells=tuple(replace(c, device=device) for c in self.cells))


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise SuiteError(f"suite file {path} does not exist")
        return path
    candidate = SUITES_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise SuiteError(f"unknown suite {name_or_path!r}; valid: {available_suites()} or a path to a .toml file")
    return candidate


def load_suite(name_or_path: str) -> Suite:
    path = suite_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - {"name", "description", "prompts", "seeds", "defaults", "matrix"}
    if unknown:
        raise SuiteError(f"{path}: unknown top-level keys {sorted(unknown)}")
    for key in ("prompts", "seeds", "defaults", "matrix"):
        if key not in data:
            raise SuiteError(f"{path}: missing required key {key!r}")
    defaults = dict(data["defaults"])
    cell_fields = {f.name for f in fields(Cell)}
    if bad := set(defaults) - cell_fields:
        raise SuiteError(f"{path}: unknown keys in [defaults]: {sorted(bad)}; valid: {sorted(cell_fields)}")
    cells: list[Cell] = []
    for i, block in enumerate(data["matrix"]):
        if bad := set(block) - cell_fields:
            raise SuiteError(f"{path}: unknown keys in [[matrix]] #{i}: {sorted(bad)}; valid: {sorted(cell_fields)}")
        axes = {k: v if isinstance(v, list) else [v] for k, v in {**defaults, **block}.items()}
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            values = dict(zip(keys, combo))
            missing = cell_fields - set(values) - {"negative_prompt", "golden"}
            if missing:
                raise SuiteError(f"{path}: [[matrix]] #{i} leaves {sorted(missing)} unset (set them in [defaults])")
            cells.append(Cell(**values))
    names = [c.name for c in cells]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise SuiteError(f"{path}: duplicate cells {dupes}")
    if not data["prompts"] or not data["seeds"]:
        raise SuiteError(f"{path}: prompts and seeds must be non-empty")
    return Suite(data.get("name", path.stem), data.get("description", ""), tuple(data["prompts"]),
                 tuple(int(s) for s in data["seeds"]), tuple(cells), path)
