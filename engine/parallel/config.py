"""Parallel config names -> a frozen ParallelSpec. Pure: importing or parsing touches no process group.

Names are small and composable so that a suite can spell a cell in one token:
    sp1             one device, nothing applied
    ulyssesN        Ulysses (all-to-all over heads) on N ranks
    ringN           ring attention on N ranks
    uspUxR          Ulysses degree U times ring degree R on a 2-D mesh
    cfg2            the two true-CFG branches on two ranks
    cfg2-<sp>       CFG over two halves, each half running <sp> (e.g. cfg2-ulysses2, cfg2-usp2x2)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

VALID_FORMS = ("sp1", "ulyssesN", "ringN", "uspUxR", "cfg2", "cfg2-ulyssesN", "cfg2-ringN", "cfg2-uspUxR")
EXAMPLES = ("sp1", "ulysses2", "ring2", "usp2x2", "cfg2", "cfg2-ulysses2")

_SP = re.compile(r"^(?:(?P<sp1>sp1)|ulysses(?P<u>\d+)|ring(?P<r>\d+)|usp(?P<uu>\d+)x(?P<rr>\d+))$")


class ParallelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ParallelSpec:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sp * self.cfg

    @property
    def is_serial(self) -> bool:
        return self.world_size == 1


def _error(name: str, why: str) -> ParallelConfigError:
    return ParallelConfigError(
        f"bad parallel config {name!r}: {why}; valid forms: {', '.join(VALID_FORMS)} (N, U, R >= 1), "
        f"e.g. {', '.join(EXAMPLES)}")


def _parse_sp(name: str, token: str) -> tuple[int, int]:
    m = _SP.match(token)
    if m is None:
        raise _error(name, f"{token!r} is not a sequence-parallel form")
    if m["sp1"]:
        return 1, 1
    if m["u"]:
        return int(m["u"]), 1
    if m["r"]:
        return 1, int(m["r"])
    return int(m["uu"]), int(m["rr"])


def parse_parallel(name: str) -> ParallelSpec:
    if not isinstance(name, str) or not name:
        raise _error(str(name), "empty")
    cfg, sp_token = 1, name
    if name.startswith("cfg"):
        head, _, rest = name.partition("-")
        if head != "cfg2":
            raise _error(name, "only CFG degree 2 exists (one rank per guidance branch)")
        cfg, sp_token = 2, rest or "sp1"
        if rest == "sp1":
            raise _error(name, "write 'cfg2', not 'cfg2-sp1'")
    ulysses, ring = _parse_sp(name, sp_token)
    if ulysses < 1 or ring < 1:
        raise _error(name, "degrees must be >= 1")
    if cfg == 2 and sp_token != "sp1" and ulysses * ring == 1:
        raise _error(name, "a degree-1 sequence part adds nothing: write 'cfg2'")
    return ParallelSpec(ulysses=ulysses, ring=ring, cfg=cfg)
