"""`parity selftest` on its fast subset (cheap plants on the fp32 cell of the tiny test suite), the run's own
self-checks, and the CLI's bad input. The whole catalogue is `parity selftest --suite smoke` (README)."""
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.selftest import CATALOGUE, TARGETS, Patcher, install
from harness.selftest.runner import FRAGILE, markdown, margins

SUITE = str(Path(__file__).with_name("data") / "tiny_suite.toml")
FAST = sorted(name for name, plant in CATALOGUE.items() if plant.fast)


def test_catalogue_is_broad_and_every_target_resolves():
    assert len(CATALOGUE) >= 25
    assert {p.area for p in CATALOGUE.values()} == {"dit", "pipeline", "quant", "parallel", "harness"}
    p = Patcher(TARGETS)
    for target in TARGETS:
        p.get(target)  # a renamed product function fails here, not silently in a sweep


def test_install_restores_the_product():
    import engine.models.flux1 as flux1

    undo = install("timestep_not_scaled")
    assert flux1.TIMESTEP_SCALE == 1.0
    undo()
    assert flux1.TIMESTEP_SCALE == 1000.0


@pytest.mark.slow
def test_fast_subset_is_caught(tmp_path, zoo_root, capsys):
    code = main(["selftest", "--suite", SUITE, "--only", *FAST, "--out", str(tmp_path), "--zoo-root", str(zoo_root)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    [run] = list(tmp_path.iterdir())
    matrix = pd.read_parquet(run / "detection.parquet")
    assert set(matrix.plant) == set(FAST) and matrix.caught.all()
    by_plant = matrix.groupby("plant")
    # Each harness plant is caught by the self-check built for it, not by accident.
    assert "(run error, exit 2)" in set(by_plant.get_group("reference_is_the_engine").comparison)
    assert "did not come from the reference backend" in " ".join(by_plant.get_group("reference_is_the_engine").why)
    assert "dropped results" in " ".join(by_plant.get_group("rows_dropped").why)
    assert "metric_crosscheck_error" in set(by_plant.get_group("metric_psnr_wrong_range").metric)
    assert (run / "detection.md").read_text().startswith(f"# parity selftest: {len(FAST)} of {len(FAST)}")


@pytest.mark.slow
def test_an_escaping_bug_exits_1(tmp_path, zoo_root, monkeypatch):
    """A plant that changes nothing must be reported as escaped: the selftest itself can fail."""
    import harness.selftest as catalogue
    from harness.selftest import runner

    harmless = catalogue.Plant("harmless", "dit", "changes nothing", ("/fp32/none/sp1/",), lambda p: None)
    monkeypatch.setitem(catalogue.CATALOGUE, "harmless", harmless)
    code, matrix, _ = runner.run_selftest(runner.Options(suite=SUITE, only=["harmless"], out=tmp_path,
                                                         zoo_root=zoo_root, baseline=False), log=lambda m: None)
    assert code == 1 and not matrix.caught.any() and "ESCAPED" in markdown(matrix)


def test_bad_input_exits_2_and_lists_the_plants(tmp_path, capsys):
    assert main(["selftest", "--only", "no_such_bug", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_bug" in err and "rope_axes_swapped" in err
    assert main(["selftest", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_margins_and_fragile_rule():
    failed = pd.DataFrame([
        {"comparison": "engine_vs_reference", "metric": "single_step_cosine", "value": 0.9989, "threshold": 0.999,
         "op": ">=", "status": "ok", "why": "x"},
        {"comparison": "engine_vs_reference", "metric": "mean_abs_diff", "value": 6.0, "threshold": 4.0,
         "op": "<=", "status": "ok", "why": "y"},
    ])
    m = margins(failed).set_index("metric")
    assert m.margin["single_step_cosine"] == pytest.approx(1e-4)
    assert m.relative_margin["single_step_cosine"] == pytest.approx(0.1)  # 1e-4 past a floor 1e-3 from perfect
    assert m.margin["mean_abs_diff"] == pytest.approx(2.0) and m.relative_margin["mean_abs_diff"] == pytest.approx(0.5)
    assert FRAGILE["max_catching_metrics"] == 1 and FRAGILE["reasoning"]


def test_a_catch_only_by_an_exactness_tier_is_fragile():
    """A bug seen only as 'not bitwise' on this CPU would pass a GPU run's floors: the matrix must say so."""
    from harness.selftest.runner import finish

    def rows(*ops, floor_caught=False):
        return pd.DataFrame([{"plant": "p", "area": "dit", "breaks": "x", "exit_code": 1, "seconds": 1.0,
                              "comparison": "engine_vs_reference", "metric": f"m{i}", "rows_failed": 4,
                              "worst_value": 0.5, "threshold": 1.0, "op": op, "margin": 0.5,
                              "relative_margin": float("inf"), "why": "w", "floor_caught": floor_caught}
                             for i, op in enumerate(ops)])
    assert finish(rows("==", "==")).fragile.all()
    assert not finish(rows("==", ">=")).fragile.any()
    assert not finish(rows("==", "==", floor_caught=True)).fragile.any()  # the floors alone would catch it too
    assert "bitwise only" in markdown(finish(rows("==")))


def test_exact_rows_remember_what_their_floor_said():
    from harness.gate import gate
    from tests.test_exact_tier import EXACT, exact_rows, rules

    judged = gate(exact_rows(rel=0.01), rules(EXACT)).rows.set_index("metric")  # past the 0.005 floor too
    assert judged.loc["single_step_rel_error", "floor_passed"] == False  # noqa: E712
    judged = gate(exact_rows(rel=1e-9), rules(EXACT)).rows.set_index("metric")
    assert judged.loc["single_step_rel_error", "floor_passed"] == True  # noqa: E712
    failed = gate(exact_rows(rel=0.01), rules(EXACT)).failed
    assert len(margins(failed)) and margins(failed).floor_caught.all()
