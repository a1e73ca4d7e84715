"""Issue 11's planted bugs each fail the gate. The full check is `parity selftest --suite wan` (every plant swept
and gated on the wan suite's cells); this test is its minimum: each plant installed from outside the product
(harness/selftest/wan.py), one engine run on a tiny config, every metric the sweep computes against one clean
diffusers run (harness.sweep.compare), gated with golden/thresholds.toml."""
import pandas as pd
import pytest
import torch

import engine.pipelines.wan as wpipe
from engine.api import RunConfig, open_runner
from harness.gate import gate
from harness.selftest import CATALOGUE, TARGETS, Patcher, install
from harness.sweep import Rows, compare
from harness.thresholds import load_thresholds
from harness.zoo import cached_build
from reference.registry import open_runner as open_reference
from tests.test_gate import frame, row

PLANTS = {name: plant.family for name, plant in CATALOGUE.items()
          if plant.family in ("wan", "wan-ti2v")}
SAMPLING = {"wan": dict(height=32, width=32, sampling=wpipe.WanSampling(
                guidance_scale=4.0, guidance_scale_2=3.0, negative_prompt="blurry", num_frames=9,
                max_sequence_length=16)),
            "wan-ti2v": dict(height=64, width=64, sampling=wpipe.WanSampling(
                guidance_scale=4.0, negative_prompt="blurry", num_frames=5, max_sequence_length=16, image=True))}


def test_catalogue_covers_issue_11_and_targets_resolve():
    assert sorted(PLANTS) == ["wan_expert_switch_late", "wan_frames_swapped", "wan_guidance_scale_2_ignored",
                              "wan_rope_frame_offset", "wan_ti2v_first_frame_timestep_not_zeroed"]
    p = Patcher(TARGETS)
    for name in PLANTS:
        install(name)()
    assert p.get("wan_expert_schedule") is wpipe.expert_schedule


def _gate(family, cfg, test, ref, ref_runner, engine):
    test.extras["single_step"] = engine.transformer_forward(ref.step0_inputs)
    ref.extras["single_step"] = ref_runner.transformer_forward(ref.step0_inputs)
    rows = Rows({}, 1, cfg.prompts)
    compare(rows, "engine_vs_reference", test, ref, list(cfg.prompts), None, family=family)
    df = frame(*[row(r["metric"], r["value"], model=family, dtype="fp32", quant="none", parallel="sp1",
                     device="cpu", optimize="eager", status=r["status"], reason=r["reason"], step=r["step"])
                 for r in rows.rows])
    return gate(df, load_thresholds())


@pytest.fixture(scope="module")
def clean(zoo_root, one_thread):
    out = {}
    for family, kw in SAMPLING.items():
        cfg = RunConfig(family=family, model_dir=str(cached_build(family, "tiny", 0, root=zoo_root)),
                        prompts=("a red fox running through snow",), steps=3, **kw)
        engine, reference = open_runner(cfg), open_reference(cfg)
        out[family] = (cfg, engine, reference, reference.generate(cfg))
    return out


def test_clean_runs_pass_and_every_plant_fails_the_gate(clean):
    for family, (cfg, engine, reference, ref) in clean.items():
        result = _gate(family, cfg, engine.generate(cfg), ref, reference, engine)
        assert result.exit_code == 0, result.failed
    caught = {}
    for name, family in PLANTS.items():
        cfg, engine, reference, ref = clean[family]
        undo = install(name)
        try:
            test = engine.generate(cfg)
            result = _gate(family, cfg, test, ref, reference, engine)
        finally:
            undo()
        # Caught by the floors, not only by the CPU exactness tier: the plants would fail on a GPU too.
        failed = result.failed
        caught[name] = sorted(set(failed[~failed.floor_passed.astype(bool)].metric)) if result.exit_code == 1 else []
    print(pd.Series(caught).to_string())
    assert all(caught.values()), caught
