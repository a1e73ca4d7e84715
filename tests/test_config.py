"""One frozen config crosses module boundaries: RunConfig (with the family's sampling object and the optimize
switches) round-trips through to_dict/from_dict, JSON and the worker's job file; suites parse their flat keys into
those dataclasses; cache keys and report columns are read off the dataclasses."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from engine.api import OptimizeSpec, RunConfig, sampling_type
from harness import schema
from harness.suites import SuiteError, load_suite

FLUX = sampling_type("flux1")


def _cfg(**kw):
    base = dict(family="flux1", model_dir="/models/x", prompts=("a", "b"), seed=3, dtype="bf16", quant="fp8",
                quant_ignored=("single_blocks.0",), parallel="cfg2",
                sampling=FLUX(guidance=4.0, true_cfg_scale=2.5, negative_prompt="blurry", max_sequence_length=16),
                optimize=OptimizeSpec(compile_blocks=True, attention="math"))
    return RunConfig(**{**base, **kw})


def test_run_config_round_trips(tmp_path):
    cfg = _cfg()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # lists back to tuples
    torch.save({"cfgs": [cfg.to_dict()]}, tmp_path / "job.pt")  # the worker's job file
    assert RunConfig.from_dict(torch.load(tmp_path / "job.pt", weights_only=True)["cfgs"][0]) == cfg
    assert hash(cfg) == hash(RunConfig.from_dict(cfg.to_dict()))  # it keys the engine-run caches


def test_run_config_defaults_and_errors():
    cfg = RunConfig(family="flux1", model_dir="x", prompts=("a",))
    assert cfg.sampling == FLUX() and cfg.optimize == OptimizeSpec()
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['guidance'\]; valid: .*'sampling'"):
        RunConfig.from_dict({**cfg.to_dict(), "guidance": 3.0})
    with pytest.raises(ValueError, match=r"RunConfig.sampling: unknown field\(s\) \['cfg'\]; valid: .*'guidance'"):
        RunConfig.from_dict({**cfg.to_dict(), "sampling": {"cfg": 1.0}})
    with pytest.raises(TypeError, match="must be a FluxSampling"):
        RunConfig(family="flux1", model_dir="x", prompts=("a",), sampling=OptimizeSpec())
    with pytest.raises(ValueError, match=r"no model family 'sd3'; valid: \[.*'flux1'"):
        RunConfig(family="sd3", model_dir="x", prompts=("a",))


def test_runner_refuses_a_config_for_another_model():
    loaded = _cfg()
    loaded.check_same_model(loaded.replace(seed=9, prompts=("c",), sampling=FLUX()))  # per-run fields may change
    with pytest.raises(ValueError, match="optimize"):
        loaded.check_same_model(loaded.replace(optimize=OptimizeSpec()))


SUITE = """
name = "t"
prompts = ["p"]
seeds = [0]
[defaults]
size = "tiny"
device = "cpu"
dtype = "bf16"
quant = "none"
parallel = "sp1"
steps = 2
height = 32
width = 32
[defaults.flux1]
guidance = 3.5
max_sequence_length = 32
[[matrix]]
model = "flux1"
compile_blocks = [false, true]
[[matrix]]
model = "flux1"
negative_prompt = "blurry"
true_cfg_scale = 2.0
"""


def test_suite_keys_come_from_the_dataclasses(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SUITE)
    cells = load_suite(str(path)).cells
    assert [c.name for c in cells] == ["flux1/tiny/bf16/none/sp1/cpu", "flux1/tiny/bf16/none/sp1/cpu/compile_blocks",
                                       "flux1/tiny/bf16/none/sp1+truecfg/cpu"]
    assert cells[1].optimize == OptimizeSpec(compile_blocks=True)
    assert cells[2].sampling == FLUX(guidance=3.5, max_sequence_length=32, negative_prompt="blurry", true_cfg_scale=2.0)
    path.write_text(SUITE.replace("compile_blocks = [false, true]", "compile = true"))
    with pytest.raises(SuiteError, match=r"unknown keys \['compile'\] for a flux1 cell; valid: .*'compile_blocks'.*'guidance'"):
        load_suite(str(path))
    path.write_text(SUITE.replace("[defaults.flux1]", "[defaults.sd3]"))
    with pytest.raises(SuiteError, match=r"\[defaults.sd3\] names no model family; valid: \[.*'flux1'"):
        load_suite(str(path))


def test_cache_keys_and_columns_derive_from_the_dataclasses(tmp_path):
    from harness.sweep import SweepContext, cell_columns, ref_key, run_config

    suite = load_suite("smoke")
    ctx = SweepContext(suite=suite, run_id="r")
    for cell in suite.cells:
        # The golden key of every smoke cell is what the explicit field list gave before the sampling object
        # existed: goldens written then still match.
        s = cell.sampling
        old = repr((cell.steps, cell.height, cell.width, s.guidance, s.true_cfg_scale, s.negative_prompt,
                    s.max_sequence_length))
        assert ref_key(cell).endswith(hashlib.sha256(old.encode()).hexdigest()[:8])
        cfg = run_config(cell, suite, tmp_path)
        assert (cfg.sampling, cfg.optimize, cfg.quant, cfg.steps) == (cell.sampling, cell.optimize, cell.quant, cell.steps)
        columns = cell_columns(cell, ctx)
        assert set(schema.CELL_COLUMNS) <= set(columns)
        assert {f.name for f in dataclasses.fields(FLUX)} <= set(columns)
