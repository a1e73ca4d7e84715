"""`parity sweep --seeds` (issue 16's false-alarm check): the suite over other seeds still gates; goldens exist only
for the suite's own seeds, so their comparison is skipped for the others, expected explicitly and said so."""
from __future__ import annotations

import pytest

from harness import selfcheck
from harness.cli import main
from harness.suites import load_suite
from harness.sweep import SweepContext, golden_note


def test_with_seeds_keeps_the_golden_seeds():
    suite = load_suite("smoke")
    other = suite.with_seeds((11, 12))
    assert other.seeds == (11, 12) and other.golden_seeds == suite.seeds == (0, 1)
    assert other.with_seeds((0, 13)).golden_seeds == (0, 1)  # the file's own, however often replaced
    with pytest.raises(ValueError, match="distinct"):
        suite.with_seeds((3, 3))


def test_expected_rows_expect_golden_rows_only_for_golden_seeds():
    suite = load_suite("smoke")
    cell = next(c for c in suite.cells if c.golden)
    key = f"{cell.name}|reference_vs_golden|psnr_db"
    own = selfcheck.expected_rows([cell], 2, 2, golden=True, clip=False, n_golden_seeds=2)
    mixed = selfcheck.expected_rows([cell], 2, 2, golden=True, clip=False, n_golden_seeds=1)
    none = selfcheck.expected_rows([cell], 2, 2, golden=True, clip=False, n_golden_seeds=0)
    assert own[key] == 4 and mixed[key] == 2 and key not in none
    assert none[f"{cell.name}|engine_vs_reference|psnr_db"] == 4  # every other comparison still expected


def test_the_run_says_which_seeds_skipped_goldens():
    suite = load_suite("smoke")
    assert golden_note(SweepContext(suite=suite, run_id="x")) == ""
    note = golden_note(SweepContext(suite=suite.with_seeds((0, 11)), run_id="x"))
    assert "skipped for seeds [11]" in note and "[0, 1]" in note
    assert golden_note(SweepContext(suite=suite.with_seeds((11,)), run_id="x", golden=False)) == ""


def test_bad_seeds_exit_2(tmp_path, capsys):
    assert main(["sweep", "--suite", "smoke", "--seeds", "4", "4", "--out", str(tmp_path), "--no-gate"]) == 2
    assert "--seeds" in capsys.readouterr().err and not any(tmp_path.iterdir())
