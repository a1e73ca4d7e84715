"""Issue 12's planted bugs each fail the gate: `parity selftest --suite ideogram4` with the Ideogram 4 catalogue
(harness/selftest/ideogram4.py) installs each from outside the product, sweeps the cells it needs (the fp32 cell; the
fp8-wo checkpoint cell for the per-column scale) and gates them. One selftest run covers all seven."""
import pytest

from harness.selftest import CATALOGUE, TARGETS, Patcher, install

PLANTS = sorted(name for name, plant in CATALOGUE.items() if plant.family == "ideogram4")


def test_catalogue_covers_issue_12_and_targets_resolve():
    assert PLANTS == ["ideogram4_fp8_scale_per_column", "ideogram4_guidance_switch_late",
                      "ideogram4_logsnr_clamp_dropped", "ideogram4_mrope_bf16", "ideogram4_schedule_float32",
                      "ideogram4_tap_off_by_one", "ideogram4_text_to_unconditional"]
    p = Patcher(TARGETS)
    for name in PLANTS:
        undo = install(name)  # installs and undoes cleanly in this process
        undo()
    import engine.pipelines.ideogram4 as ipipe

    assert p.get("ideogram4_tapped_layers") is ipipe.tapped_layers


@pytest.mark.slow
def test_every_ideogram4_plant_fails_the_gate(tmp_path, zoo_root):
    from harness.selftest import runner

    code, matrix, _ = runner.run_selftest(runner.Options(suite="ideogram4", only=PLANTS, out=tmp_path,
                                                         zoo_root=zoo_root, baseline=False), log=print)
    caught = matrix.groupby("plant").caught.any()
    print(matrix[["plant", "comparison", "metric", "worst_value", "threshold"]].to_string())
    assert code == 0 and set(caught.index) == set(PLANTS) and caught.all(), caught
