"""Shards for CI matrices: `--shard K/N` runs a deterministic slice of a suite's cells.

Cells are dealt round-robin in suite order (cell i goes to shard i mod N + 1): the same suite always gives the same
slices, every cell lands in exactly one shard, and the slow cells, which suites list together (the multi-rank ones
last), are spread over the shards instead of piling up in the last one. `parity merge` (harness.merge) puts the
shards' reports back together in suite order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based, as written on the command line
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 1 <= K <= N (e.g. 1/4)")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"--shard {text!r}: expected K/N with 1 <= K <= N, e.g. 1/4")
        return cls(int(m.group(1)), int(m.group(2)))

    def select(self, items: Sequence[T]) -> tuple[T, ...]:
        return tuple(item for i, item in enumerate(items) if i % self.count == self.index - 1)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
