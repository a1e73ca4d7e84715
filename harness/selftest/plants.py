"""The plant mechanism every family's catalogue uses: a Plant record and a Patcher that installs it from outside the
product (setattr on one function or attribute named in the catalogue's TARGETS, undone in reverse order). Generic:
names no family; the registry (harness/selftest/__init__.py) merges the families' TARGETS and catalogues."""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

WHERE = ("process", "ranks", "both")
AREAS = ("dit", "pipeline", "quant", "parallel", "harness")


def _resolve(targets: Mapping[str, str], target: str):
    """'pkg.mod:A.b' -> (the object holding b, 'b')."""
    try:
        spec = targets[target]
    except KeyError:
        raise KeyError(f"unknown plant target {target!r}; valid: {sorted(targets)}") from None
    module, _, attrs = spec.partition(":")
    owner = importlib.import_module(module)
    *path, attr = attrs.split(".")
    for name in path:
        owner = getattr(owner, name)
    return owner, attr


class Patcher:
    """pytest's monkeypatch, reduced to what plants need: every change is undone in reverse order. `targets` maps a
    plant's target names to 'module:attribute.path' (the registry's merged TARGETS)."""

    def __init__(self, targets: Mapping[str, str]):
        self.targets = targets
        self._undo: list[Callable[[], None]] = []

    def get(self, target: str):
        owner, attr = _resolve(self.targets, target)
        return getattr(owner, attr)

    def set(self, target: str, value) -> None:
        owner, attr = _resolve(self.targets, target)
        old = owner.__dict__[attr] if isinstance(owner, type) and attr in owner.__dict__ else getattr(owner, attr)
        setattr(owner, attr, value)
        self._undo.append(lambda: setattr(owner, attr, old))

    def wrap(self, target: str, make: Callable[[Callable], Callable]) -> None:
        """Replace target by make(original)."""
        self.set(target, make(self.get(target)))

    def setitem(self, target: str, key, value) -> None:
        mapping = self.get(target)
        old = mapping[key]
        mapping[key] = value
        self._undo.append(lambda: mapping.__setitem__(key, old))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@dataclass(frozen=True)
class Plant:
    name: str
    area: str  # dit | pipeline | quant | parallel | harness
    breaks: str  # the mistake, in words
    cells: tuple[str, ...]  # suite cells that show it (substrings of cell names)
    install: Callable[[Patcher], None]
    where: str = "process"  # process: the sweep process; ranks: torchrun ranks only; both
    # Cell fields the plant needs changed: a value, or a function of the cell giving it (e.g. a sampling object).
    overrides: Mapping[str, object] = field(default_factory=dict)
    fast: bool = False  # in the `make test` subset: cheap and on the fp32 cell
    known_gap: str = ""  # why today's gate may let it through, and what closes the gap (shown when it escapes)
    family: str | None = None  # the model family whose cells it runs on (set by catalogue()); None: any

    def __post_init__(self) -> None:
        if self.where not in WHERE:
            raise ValueError(f"plant {self.name}: where={self.where!r}; valid: {list(WHERE)}")
        if self.area not in AREAS:
            raise ValueError(f"plant {self.name}: area={self.area!r}; valid: {list(AREAS)}")

    def runs_on(self, cell) -> bool:
        """Whether a suite cell is one this plant needs: its family's, and named by one of its patterns."""
        return (self.family is None or cell.model == self.family) and any(pat in cell.name for pat in self.cells)


def catalogue(family: str, *plants: Plant) -> dict[str, Plant]:
    """A family's catalogue: name -> plant, each bound to the family's cells; duplicate names fail."""
    out: dict[str, Plant] = {}
    for plant in plants:
        if plant.name in out:
            raise ValueError(f"duplicate plant {plant.name!r}")
        out[plant.name] = dataclasses.replace(plant, family=family)
    return out
