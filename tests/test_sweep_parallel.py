"""Multi-rank cells through the `parity` CLI (torchrun, gloo on CPU): every parallel config matches one device
in fp32 with an odd image token count, and each planted sequence-parallel bug makes the gate fail. Plants reach
the torchrun ranks through the catalogue's generated sitecustomize.py on PYTHONPATH, so no product code knows
about them."""
import os
from pathlib import Path

import pandas as pd
import pytest

from harness import schema
from harness.cli import main
from harness.selftest import sitecustomize_source

TESTS = Path(__file__).parent
SUITE = str(TESTS / "data" / "parallel_suite.toml")
pytestmark = pytest.mark.slow


def sweep(tmp_path, zoo_root, cells):
    code = main(["sweep", "--suite", SUITE, "--out", str(tmp_path), "--run-id", "run", "--zoo-root", str(zoo_root),
                 "--cells", *cells])
    return code, tmp_path / "run"


def test_every_parallel_config_matches_one_device(tmp_path, zoo_root):
    code, run = sweep(tmp_path, zoo_root, ["/"])
    assert code == 0, (run / "summary.md").read_text()
    frame = pd.read_parquet(run / "results.parquet")
    assert set(frame.parallel) == {"ulysses2", "ring2", "usp2x2", "cfg2"}
    final = frame[(frame.comparison == schema.PARALLEL_VS_SINGLE) & (frame.metric == "final_latent_cosine")]
    assert len(final) == 4 * 2 and (final.value >= 0.999999).all(), final[["cell", "value"]]


# Catalogue plant (harness/selftest/) -> the FLUX.1 cell it breaks (tests/data/parallel_suite.toml). Not here:
# ring_text_double_counted, since FLUX.1 cuts its text across the ring (no replicated text on its ring cells); it
# is Z-Image's now (tests/test_z_image_selftest.py), and tests/test_parallel_pipeline.py plants it in a FLUX.1 ring
# run with the text kept whole.
PLANTS = {
    "rope_shard_offset": "/ulysses2/",
    "uneven_tail_padded": "/ring2/",  # the suite's 36x36 images give an odd token count
    "cfg_ranks_different_noise": "/cfg2",
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_parallel_bug_fails_the_gate(tmp_path, zoo_root, monkeypatch, plant):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(sitecustomize_source(plant, str(TESTS.parent)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    code, run = sweep(tmp_path, zoo_root, [PLANTS[plant]])
    assert code == 1, (run / "summary.md").read_text()
    summary = (run / "summary.md").read_text()
    assert "FAIL" in summary and (schema.PARALLEL_VS_SINGLE in summary or "ReplicationError" in summary)


def test_planted_overlap_bug_fails_against_the_ranks_without_it(tmp_path, zoo_root, monkeypatch):
    """The smoke suite's sp_overlap cell (bf16 ulysses2, one seed): a bug in the overlap path only (the MLP row GEMMs
    cut one row early) fails optimized_vs_eager, which compares the cell with the same ranks without the switch."""
    from harness.gate import gate
    from harness.report import load_results
    from harness.thresholds import load_thresholds

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(sitecustomize_source("sp_overlap_mlp_rows_off_by_one", str(TESTS.parent)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    code = main(["sweep", "--suite", "smoke", "--cells", "sp_overlap", "--seeds", "0", "--no-golden", "--out",
                 str(tmp_path), "--run-id", "run", "--zoo-root", str(zoo_root)])
    assert code == 1, (tmp_path / "run" / "summary.md").read_text()
    rows = gate(load_results(tmp_path / "run"), load_thresholds()).rows
    failed = rows[rows.passed == False]  # noqa: E712 (nullable boolean)
    assert schema.OPTIMIZED_VS_EAGER in set(failed.comparison), sorted(set(failed.comparison))
    # ... by its floors too, not only by the CPU exactness tier (a GPU run judges by the floors)
    floors = failed[(failed.comparison == schema.OPTIMIZED_VS_EAGER) & (failed.floor_passed == False)]  # noqa: E712
    assert len(floors), failed[["comparison", "metric", "value", "threshold"]].to_string()
