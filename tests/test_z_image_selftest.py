"""Issue 10's planted bugs each fail the gate: `parity selftest --suite zimage` with the Z-Image catalogue
(harness/selftest/z_image.py) installs each from outside the product, sweeps the cells it needs and gates them.
The two sequence-parallel plants run in the torchrun ranks only (sglang's Z-Image bugs: the caption sharded with the
image instead of replicated; the replicated caption's RoPE positions one off)."""
import pandas as pd
import pytest

from harness.selftest import CATALOGUE, TARGETS, Patcher, install

PLANTS = sorted(name for name, plant in CATALOGUE.items() if plant.family == "z-image")


def test_catalogue_covers_issue_10_and_targets_resolve():
    assert PLANTS == ["z_image_caption_rope_offset", "z_image_caption_sharded", "z_image_cfg_normalization_wrong_norm",
                      "z_image_cfg_scale_as_w", "z_image_output_not_negated"]
    p = Patcher(TARGETS)
    for name in PLANTS:
        undo = install(name)  # installs and undoes cleanly in this process
        undo()
    import engine.pipelines.z_image as zpipe

    assert p.get("z_image_velocity") is zpipe.velocity


@pytest.mark.slow
def test_every_z_image_plant_fails_the_gate(tmp_path, zoo_root):
    from harness.selftest import runner

    code, matrix, _ = runner.run_selftest(runner.Options(suite="zimage", only=PLANTS, out=tmp_path,
                                                         zoo_root=zoo_root, baseline=False), log=print)
    caught = matrix.groupby("plant").caught.any()
    print(matrix[["plant", "comparison", "metric", "worst_value", "threshold"]].to_string())
    assert code == 0 and set(caught.index) == set(PLANTS) and caught.all(), caught
