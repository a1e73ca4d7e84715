"""Issue 10's planted bugs each fail the gate. The full check is `parity selftest --suite zimage` (every plant of
harness/selftest/z_image.py swept and gated on the zimage suite's cells); this test is its minimum, as
tests/test_wan_selftest.py is Wan's: each plant installed by the selftest's own installer, from outside the product;
one engine run on the settings of the suite cell it breaks (its prompts, 40x48, seed 0; Turbo's 8 steps or CFG's 4);
every metric the sweep computes (harness.sweep.compare) against one clean run, gated with golden/thresholds.toml.
- The pipeline plants (fp32, one device) against one clean diffusers run.
- The sequence-parallel plants (sglang's Z-Image bugs: the caption sharded with the image instead of replicated;
  the replicated caption's RoPE positions one off; and the ring's replicated caption counted once per ring rank, on
  the ring cell only) installed in 2 gloo ranks only, Ulysses and ring (the suite's bf16 ulysses2 and ring2 cells),
  against the clean one-device engine, as the sweep's parallel_vs_single_device.
The clean runs pass the same gate, so each failure is its plant's doing."""
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from harness.selftest import CATALOGUE, TARGETS, Patcher, install

PLANTS = sorted(name for name, plant in CATALOGUE.items() if plant.family == "z-image")
SP_PLANTS = sorted(name for name in PLANTS if CATALOGUE[name].where == "ranks")
# The zimage suite's cells (harness/suites/zimage.toml) whose names the catalogue lists: settings per cell name.
PROMPTS = ("a red fox standing in fresh snow, morning light", "a lighthouse on a cliff at dusk, oil painting")
CELLS = {"/fp32/none/sp1/": dict(dtype="fp32", steps=8, cfg=False),
         "/fp32/none/sp1+truecfg/": dict(dtype="fp32", steps=4, cfg=True),
         "/bf16/none/ulysses2/": dict(dtype="bf16", steps=8, cfg=False, parallel="ulysses2"),
         "/bf16/none/ring2/": dict(dtype="bf16", steps=8, cfg=False, parallel="ring2")}
SP_RANKS = {"ulysses2": (0, 1), "ring2": (2, 3)}  # one world of 4 processes runs both schemes side by side


def test_catalogue_covers_issue_10_and_targets_resolve():
    assert PLANTS == ["ring_text_double_counted", "z_image_caption_rope_offset", "z_image_caption_sharded",
                      "z_image_cfg_normalization_wrong_norm", "z_image_cfg_scale_as_w", "z_image_output_not_negated"]
    assert SP_PLANTS == ["ring_text_double_counted", "z_image_caption_rope_offset", "z_image_caption_sharded"]
    assert all(set(CATALOGUE[name].cells) <= set(CELLS) for name in PLANTS), "a plant's cell has no settings here"
    p = Patcher(TARGETS)
    for name in PLANTS:
        undo = install(name)  # installs and undoes cleanly in this process
        undo()
    import engine.pipelines.z_image as zpipe

    assert p.get("z_image_velocity") is zpipe.velocity


def _cfg(model_dir: str, cell: str):
    from engine.api import RunConfig
    from engine.pipelines.z_image import ZImageSampling

    s = CELLS[cell]
    sampling = (ZImageSampling(guidance_scale=4.0, negative_prompt="blurry, low quality", cfg_normalization=1.0,
                               cfg_truncation=0.3) if s["cfg"] else ZImageSampling(guidance_scale=0.0))
    return RunConfig(family="z-image", model_dir=model_dir, prompts=PROMPTS, seed=0, steps=s["steps"], height=40,
                     width=48, dtype=s["dtype"], parallel=s.get("parallel", "sp1"), sampling=sampling)


def _gate(cfg, comparison: str, test, ref):
    """The sweep's rows of `test` against `ref` for cfg's cell, gated with the project's thresholds."""
    from harness.gate import gate
    from harness.sweep import Rows, compare
    from harness.thresholds import load_thresholds
    from tests.test_gate import frame, row

    rows = Rows({}, len(cfg.prompts), cfg.prompts)
    compare(rows, comparison, test, ref, list(cfg.prompts), None, family="z-image")
    df = frame(*[row(r["metric"], r["value"], model="z-image", dtype=cfg.dtype, quant="none", parallel=cfg.parallel,
                     device="cpu", optimize="eager", comparison=comparison, prompt_idx=r["prompt_idx"],
                     status=r["status"], reason=r["reason"], step=r["step"]) for r in rows.rows])
    return gate(df, load_thresholds())


def _caught_by(result) -> list[str]:
    """The metrics whose ordinary floors fail: caught by the floors, not only by the CPU exactness tier, so each
    plant would fail on a GPU too (as tests/test_wan_selftest.py asks)."""
    failed = result.failed
    # floor_passed is set where an exactness tier judged the row; elsewhere (NA) the floor was the judgement.
    return sorted(set(failed[~failed.floor_passed.fillna(False).astype(bool)].metric)) if result.exit_code == 1 else []


def _plants_on(parallel: str) -> list[str]:
    """The sequence-parallel plants whose catalogue cells include this scheme's cell (the ring's only on ring2)."""
    return [name for name in SP_PLANTS if f"/bf16/none/{parallel}/" in CATALOGUE[name].cells]


def _sp_worker(proc: int, tmp: str, model_dir: str):
    """Rank `proc` of 4: Ulysses-2 on processes 0-1 and ring-2 on 2-3, clean and then under each plant, installed
    here only (the one-device run it is compared with is the parent's, clean)."""
    torch.set_num_threads(1)  # 4 processes on 2 cores
    from engine.runner import open_runner

    parallel = next(p for p, ranks in SP_RANKS.items() if proc in ranks)
    rank = SP_RANKS[parallel].index(proc)
    cfg = _cfg(model_dir, f"/bf16/none/{parallel}/")
    step0 = torch.load(f"{tmp}/step0.pt")
    for i, plant in enumerate([None, *_plants_on(parallel)]):
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{parallel}-{i}", rank=rank, world_size=2)
        undo = install(plant) if plant else (lambda: None)
        try:
            runner = open_runner(cfg)
            art = runner.generate(cfg)
            art.extras["single_step"] = runner.transformer_forward(step0)
        finally:
            undo()
            dist.destroy_process_group()
        if rank == 0:
            torch.save(art, f"{tmp}/{parallel}-{plant or 'clean'}.pt")


@pytest.fixture(scope="module")
def model_dir(zoo_root):
    from harness.zoo import cached_build

    return str(cached_build("z-image", "tiny", seed=0, root=zoo_root))


def test_every_pipeline_plant_fails_the_gate(model_dir, one_thread):
    from engine.api import open_runner
    from reference.registry import open_runner as open_reference

    clean = {}
    for cell in ("/fp32/none/sp1/", "/fp32/none/sp1+truecfg/"):
        cfg = _cfg(model_dir, cell)
        engine, reference = open_runner(cfg), open_reference(cfg)
        ref = reference.generate(cfg)
        ref.extras["single_step"] = reference.transformer_forward(ref.step0_inputs)
        clean[cell] = (cfg, engine, ref)
        result = _gate(cfg, "engine_vs_reference", _engine_run(engine, cfg, ref), ref)
        assert result.exit_code == 0, (cell, result.failed)
    caught = {}
    for name in sorted(set(PLANTS) - set(SP_PLANTS)):
        (cell,) = CATALOGUE[name].cells
        cfg, engine, ref = clean[cell]
        undo = install(name)
        try:
            caught[name] = _caught_by(_gate(cfg, "engine_vs_reference", _engine_run(engine, cfg, ref), ref))
        finally:
            undo()
    print(pd.Series(caught).to_string())
    assert len(caught) == 3 and all(caught.values()), caught


def _engine_run(engine, cfg, ref):
    test = engine.generate(cfg)
    test.extras["single_step"] = engine.transformer_forward(ref.step0_inputs)
    return test


def test_every_sequence_parallel_plant_fails_the_gate(model_dir, tmp_path, start_ranks, one_thread):
    from engine.api import open_runner

    single_cfg = _cfg(model_dir, "/bf16/none/ulysses2/").replace(parallel="sp1")
    engine = open_runner(single_cfg)
    single = engine.generate(single_cfg)
    single.extras["single_step"] = engine.transformer_forward(single.step0_inputs)
    torch.save(single.step0_inputs, tmp_path / "step0.pt")
    start_ranks(_sp_worker, (str(tmp_path), model_dir), 4)
    caught = {}
    for parallel in SP_RANKS:
        cfg = _cfg(model_dir, f"/bf16/none/{parallel}/")
        clean = _gate(cfg, "parallel_vs_single_device", torch.load(tmp_path / f"{parallel}-clean.pt",
                                                                    weights_only=False), single)
        assert clean.exit_code == 0, (parallel, clean.failed)
        for name in _plants_on(parallel):
            test = torch.load(tmp_path / f"{parallel}-{name}.pt", weights_only=False)
            caught[(name, parallel)] = _caught_by(_gate(cfg, "parallel_vs_single_device", test, single))
    print(pd.Series(caught).to_string())
    # The selftest counts a plant caught when the sweep of its cells (both schemes) fails the gate.
    assert all(any(caught.get((name, p)) for p in SP_RANKS) for name in SP_PLANTS), caught
