"""A planted Qwen sequence-parallel bug fails the gate through the `parity` CLI: in the torchrun ranks only, each
shard's RoPE rows are taken one token early (the cut of the frequencies no longer matches the cut of the tokens,
condition-image tokens included). Installed by a sitecustomize.py written here, so no product code knows."""
import os
from pathlib import Path

import pytest

from harness import schema
from harness.cli import main

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slow

PLANT = """import os, sys
if 'RANK' in os.environ:  # only the torchrun ranks, never the sweep process (the single-device run stays clean)
    sys.path.insert(0, {root!r})
    import engine.parallel.transformer as T
    real = T.shard_positions
    T.shard_positions = lambda plan, ids, dim, index: real(plan, ids.roll(1, dims=dim), dim, index)
"""


def test_rope_rows_cut_apart_from_their_tokens_fail_the_gate(tmp_path, zoo_root, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PLANT.format(root=str(TESTS.parent)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    code = main(["sweep", "--suite", str(TESTS / "data" / "qwen_parallel_suite.toml"), "--out", str(tmp_path),
                 "--run-id", "run", "--zoo-root", str(zoo_root), "--no-ref-cache"])
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert code == 1, summary
    assert "FAIL" in summary and schema.PARALLEL_VS_SINGLE in summary, summary
