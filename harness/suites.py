"""Suites are data: a TOML file lists prompts, seeds, sampling defaults and a matrix of cells
(model x dtype x quant x parallel x device x optimize switches). This module turns one into a list of frozen Cells.

Keys are flat in the TOML: a Cell field, a switch of the engine's OptimizeSpec (compile_blocks, attention...), or a
field of the cell's family's sampling object (engine.api.sampling_type), which the cell holds as one typed object.
Sampling defaults for one family go in `[defaults.<family>]`; every key's meaning comes from those dataclasses."""
from __future__ import annotations

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from engine.api import OptimizeSpec, dataclass_from_dict, family_names, sampling_type

SUITES_DIR = Path(__file__).with_name("suites")
# online: quantize a bf16 folder at load; checkpoint: a `parity quantize` folder; calibrated: the same with static
# input scales calibrated on the suite's prompts (`parity quantize --calibrate`)
QUANT_SOURCES = ("online", "checkpoint", "calibrated")
CHECKPOINT_SUFFIX = {"online": "", "checkpoint": "-ckpt", "calibrated": "-ckpt-static"}
OPTIMIZE_KEYS = tuple(f.name for f in fields(OptimizeSpec))


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
    sampling: Any = None  # the family's sampling object (None: its defaults)
    optimize: OptimizeSpec = OptimizeSpec()
    golden: bool = True
    quant_ignored: tuple[str, ...] = ()  # layers kept unquantized, matched on module-name dot boundaries
    quant_ignored_from: str | None = None  # an advice.json of `parity sensitivity`: its patterns join quant_ignored
    quant_source: str = "online"  # "online": quantize a bf16 folder at load; "checkpoint": a `parity quantize` folder
    timeout_s: float = 600.0  # multi-process cells are killed after this

    def __post_init__(self) -> None:
        object.__setattr__(self, "quant_ignored", tuple(self.quant_ignored))  # TOML gives lists
        if self.sampling is None:
            object.__setattr__(self, "sampling", sampling_type(self.model)())
        if self.quant_ignored_from is not None:
            from harness.advice import load_advice

            try:
                advised = load_advice(self.quant_ignored_from, self.quant)
            except ValueError as e:
                raise SuiteError(str(e)) from None
            # dataclasses.replace re-runs this with the patterns already added: add each once.
            extra = tuple(p for p in advised if p not in self.quant_ignored)
            object.__setattr__(self, "quant_ignored", self.quant_ignored + extra)
        if self.quant_source not in QUANT_SOURCES:
            raise SuiteError(f"cell quant_source {self.quant_source!r}; valid: {list(QUANT_SOURCES)}")
        if self.quant_source != "online" and self.quant == "none":
            raise SuiteError(f"quant_source = {self.quant_source!r} needs a quant mode, not 'none'")

    @property
    def name(self) -> str:
        quant = self.quant + CHECKPOINT_SUFFIX[self.quant_source]
        cfg = "+truecfg" if self.sampling.true_cfg else ""
        # A sampling object may name a mode that changes what is generated besides CFG (Wan TI2V's "+image").
        cfg += getattr(self.sampling, "cell_tag", "")
        optimized = [] if self.optimize == OptimizeSpec() else [optimize_label(self.optimize)]
        return "/".join([self.model, self.size, self.dtype, quant, self.parallel + cfg, self.device, *optimized])


def optimize_label(spec: OptimizeSpec) -> str:
    """'eager' for the default spec, else its non-default switches ('compile_blocks', 'attention=math')."""
    changed = [f for f in fields(spec) if getattr(spec, f.name) != f.default]
    if not changed:
        return "eager"
    return "+".join(f.name if getattr(spec, f.name) is True else f"{f.name}={getattr(spec, f.name)}" for f in changed)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    cells: tuple[Cell, ...]
    path: Path
    # The seeds whose goldens `parity golden update` wrote (the suite file's own seeds); None: `seeds` themselves.
    # Differs from `seeds` only after with_seeds().
    own_seeds: tuple[int, ...] | None = None

    @property
    def golden_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.own_seeds is None else self.own_seeds

    def with_seeds(self, seeds: tuple[int, ...]) -> "Suite":
        """The same suite over other seeds (false-alarm checks). Goldens exist only for the file's own seeds: the
        sweep compares against them only there, and says so (SweepContext, meta.json `golden_note`)."""
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
        return replace(self, seeds=tuple(int(s) for s in seeds), own_seeds=self.golden_seeds)

    def with_device(self, device: str) -> "Suite":
        return replace(self, cells=tuple(replace(c, device=device) for c in self.cells))

    def with_quant_ignored(self, patterns: tuple[str, ...]) -> "Suite":
        """Add ignored-layer patterns to every quantized cell."""
        return replace(self, cells=tuple(replace(c, quant_ignored=c.quant_ignored + tuple(patterns))
                                         if c.quant != "none" else c for c in self.cells))


_CELL_KEYS = {f.name for f in fields(Cell)} - {"sampling", "optimize"}
_REQUIRED = {f.name for f in fields(Cell) if f.default is dataclasses.MISSING}


def _cell(values: dict, family_defaults: dict, where: str) -> Cell:
    """One Cell from flat TOML keys: cell fields, OptimizeSpec switches and the family's sampling fields."""
    family = values.get("model")
    if family not in family_names():
        raise SuiteError(f"{where}: model {family!r} is no model family; valid: {family_names()}")
    sampling_keys = {f.name for f in fields(sampling_type(family))}
    values = {**family_defaults.get(family, {}), **values}
    if bad := set(values) - _CELL_KEYS - set(OPTIMIZE_KEYS) - sampling_keys:
        valid = sorted(_CELL_KEYS | set(OPTIMIZE_KEYS) | sampling_keys)
        raise SuiteError(f"{where}: unknown keys {sorted(bad)} for a {family} cell; valid: {valid}")
    if missing := _REQUIRED - set(values):
        raise SuiteError(f"{where} leaves {sorted(missing)} unset (set them in [defaults])")
    try:
        sampling = dataclass_from_dict(sampling_type(family), {k: values[k] for k in sampling_keys if k in values},
                                       what=f"{family} sampling")
        optimize = dataclass_from_dict(OptimizeSpec, {k: values[k] for k in OPTIMIZE_KEYS if k in values},
                                       what="optimize")
    except (TypeError, ValueError) as e:
        raise SuiteError(f"{where}: {e}") from None
    return Cell(**{k: v for k, v in values.items() if k in _CELL_KEYS}, sampling=sampling, optimize=optimize)


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
    defaults = {k: v for k, v in data["defaults"].items() if not isinstance(v, dict)}
    family_defaults = {k: v for k, v in data["defaults"].items() if isinstance(v, dict)}
    if bad := set(family_defaults) - set(family_names()):
        raise SuiteError(f"{path}: [defaults.{sorted(bad)[0]}] names no model family; valid: {family_names()}")
    cells: list[Cell] = []
    for i, block in enumerate(data["matrix"]):
        # A list is an axis of the matrix, except for quant_ignored, whose value is itself a list of patterns.
        axes = {k: [v] if k == "quant_ignored" or not isinstance(v, list) else v for k, v in {**defaults, **block}.items()}
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            values = dict(zip(keys, combo))
            if values.get("quant_ignored_from"):  # relative to the suite file
                values["quant_ignored_from"] = str(path.parent / values["quant_ignored_from"])
            cells.append(_cell(values, family_defaults, f"{path}: [[matrix]] #{i}"))
    names = [c.name for c in cells]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise SuiteError(f"{path}: duplicate cells {dupes}")
    if not data["prompts"] or not data["seeds"]:
        raise SuiteError(f"{path}: prompts and seeds must be non-empty")
    return Suite(data.get("name", path.stem), data.get("description", ""), tuple(data["prompts"]),
                 tuple(int(s) for s in data["seeds"]), tuple(cells), path)
