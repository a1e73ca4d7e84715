"""The step-0 conditioning metrics (harness/conditioning.py): what the engine feeds its denoiser as conditioning
against what diffusers feeds its transformer. Unit checks of the comparison, then the gap they close: a FLUX.1
text-path plant (the selftest's own installer, from outside the product) that the tiny DiT hides from every output
floor fails the gate's ordinary floors through these rows, not only the CPU exactness tier."""
import math

import pandas as pd
import pytest
import torch

from harness import conditioning as C
from harness.metrics import MetricError

NAMES = ("encoder_hidden_states", "pooled_projections", "negative.encoder_hidden_states", "negative.pooled_projections")


def _inputs(batch=2, negative=True):
    g = torch.Generator().manual_seed(0)
    out = {"encoder_hidden_states": torch.randn(batch, 5, 8, generator=g),
           "pooled_projections": torch.randn(batch, 8, generator=g),
           "hidden_states": torch.randn(batch, 16, 4, generator=g)}
    if negative:
        out.update({"negative." + k: torch.randn(v.shape, generator=g) for k, v in list(out.items())})
        out["guided.true_cfg_scale"] = torch.tensor(3.0, dtype=torch.float64)
    return out


def test_scale_is_seen_by_rel_error_and_the_worst_tensor_is_named():
    ref = _inputs()
    test = {k: v.clone() for k, v in ref.items()}
    test["negative.encoder_hidden_states"] = test["negative.encoder_hidden_states"] * 1.01
    test["hidden_states"] = test["hidden_states"] * 5  # not conditioning: ignored
    out = C.compare(test, ref, NAMES, 2)
    cos, where = out["conditioning_cosine"]
    rel, rel_where = out["conditioning_rel_error"]
    assert (cos >= 1 - 1e-12).all()  # a scale keeps the direction: cosine cannot see it
    assert rel == pytest.approx([0.01, 0.01], rel=1e-5) and rel_where == ["negative.encoder_hidden_states"] * 2
    test["pooled_projections"][1] = -test["pooled_projections"][1]  # one sample's pooled embedding flipped
    cos, where = C.compare(test, ref, NAMES, 2)["conditioning_cosine"]
    assert cos[0] > 0.999 and cos[1] == pytest.approx(-1.0) and where[1] == "pooled_projections"


def test_one_row_serves_every_sample():
    """diffusers encodes one negative prompt once for the batch ((1, S, D)); an engine that repeats it per sample
    feeds the same input, and a wrong row in the repeat is still seen."""
    ref = _inputs()
    ref["negative.encoder_hidden_states"] = ref["negative.encoder_hidden_states"][:1]
    test = {k: v.clone() for k, v in ref.items()}
    test["negative.encoder_hidden_states"] = ref["negative.encoder_hidden_states"].repeat(2, 1, 1)
    assert list(C.compare(test, ref, NAMES, 2)["conditioning_rel_error"][0]) == [0.0, 0.0]
    test["negative.encoder_hidden_states"][1] *= 1.5
    rel, where = C.compare(test, ref, NAMES, 2)["conditioning_rel_error"]
    assert rel[0] == 0.0 and rel[1] == pytest.approx(0.5) and where[1] == "negative.encoder_hidden_states"


def test_negative_branch_is_compared_only_where_the_reference_ran_one():
    ref = _inputs(negative=False)
    out = C.compare({k: v.clone() for k, v in ref.items()}, ref, NAMES, 2)
    assert list(out["conditioning_cosine"][0]) == [1.0, 1.0] and list(out["conditioning_rel_error"][0]) == [0.0, 0.0]
    with pytest.raises(MetricError, match="negative branch"):
        C.compare(_inputs(negative=True), ref, NAMES, 2)


@pytest.mark.parametrize("breakage, message", [
    (lambda t: t.pop("pooled_projections"), r"test step-0 inputs lack conditioning \['pooled_projections'\]"),
    (lambda t: t.__setitem__("encoder_hidden_states", t["encoder_hidden_states"][:, :4]), "shape mismatch"),
    (lambda t: t["negative.pooled_projections"].__setitem__((0, 0), math.nan), "1 NaN"),
    (lambda t: t["encoder_hidden_states"].__setitem__((1, 0, 0), math.inf), "1 Inf"),
    (lambda t: t.__setitem__("pooled_projections", t["pooled_projections"][[0, 1, 1]]), "neither one row per sample"),
])
def test_refusals(breakage, message):
    """Missing, mis-shaped or non-finite conditioning never gives a number: the row is invalid and fails the gate."""
    ref = _inputs()
    test = {k: v.clone() for k, v in ref.items()}
    breakage(test)
    with pytest.raises(MetricError, match=message):
        C.compare(test, ref, NAMES, 2)
    with pytest.raises(MetricError, match="declares no conditioning"):
        C.compare(ref, ref, (), 2)


# ---------------------------------------------------------------- the gap, closed: FLUX.1 text-path plants
PLANTS = ("t5_embeddings_scaled", "pooled_text_wrong_output")


@pytest.fixture(scope="module")
def flux_clean(zoo_root, one_thread):
    """The smoke suite's fp32 cell settings (4 steps, 64x64, its two prompts), seed 0: engine and diffusers."""
    from engine.api import RunConfig, open_runner
    from engine.pipelines.flux1 import FluxSampling
    from harness.zoo import cached_build
    from reference.registry import open_runner as open_reference

    cfg = RunConfig(family="flux1", model_dir=str(cached_build("flux1", "tiny", seed=0, root=zoo_root)),
                    prompts=("a red fox standing in fresh snow, morning light",
                             "a lighthouse on a cliff at dusk, oil painting"),
                    steps=4, height=64, width=64, sampling=FluxSampling(guidance=3.5, max_sequence_length=32))
    reference = open_reference(cfg)
    ref = reference.generate(cfg)
    ref.extras["single_step"] = reference.transformer_forward(ref.step0_inputs)
    return cfg, open_runner(cfg), ref


def _gate(cfg, engine, ref):
    """Every metric the sweep computes for the fp32 cell (harness.sweep.compare), gated with the project's thresholds."""
    from harness.gate import gate
    from harness.sweep import Rows, compare
    from harness.thresholds import load_thresholds
    from tests.test_gate import frame, row

    test = engine.generate(cfg)
    test.extras["single_step"] = engine.transformer_forward(ref.step0_inputs)
    rows = Rows({}, len(cfg.prompts), cfg.prompts)
    compare(rows, "engine_vs_reference", test, ref, list(cfg.prompts), None, family="flux1")
    df = frame(*[row(r["metric"], r["value"], model="flux1", dtype="fp32", quant="none", parallel="sp1",
                     device="cpu", optimize="eager", prompt_idx=r["prompt_idx"], status=r["status"],
                     reason=r["reason"], step=r["step"]) for r in rows.rows])
    return gate(df, load_thresholds()), df


def _floor_failures(result) -> list[str]:
    """Metrics whose ordinary floors fail (floor_passed is set where an exactness tier judged the row; NA: the floor
    was the judgement), i.e. what a device without an exactness tier would still catch."""
    failed = result.failed
    return sorted(set(failed[~failed.floor_passed.fillna(False).astype(bool)].metric))


def test_clean_flux_passes_with_bitwise_conditioning(flux_clean):
    result, df = _gate(*flux_clean)
    assert result.exit_code == 0, result.failed
    cond = df[df.metric.isin(C.METRICS)].set_index("metric").value
    assert list(cond["conditioning_cosine"]) == [1.0, 1.0] and list(cond["conditioning_rel_error"]) == [0.0, 0.0]


@pytest.mark.parametrize("plant", PLANTS)
def test_flux_text_path_plant_fails_the_floors_through_conditioning(flux_clean, plant):
    from harness.selftest import install

    undo = install(plant)
    try:
        result, df = _gate(*flux_clean)
    finally:
        undo()
    caught = _floor_failures(result)
    values = df[df.metric.isin(C.METRICS + ("final_latent_cosine", "single_step_cosine"))]
    print(plant, caught, values.groupby("metric").value.agg(["min", "max"]).to_dict())
    assert result.exit_code == 1
    # The scale keeps the direction (cosine ~1): relative error sees it; the BOS-token pool turns the direction.
    assert {"t5_embeddings_scaled": "conditioning_rel_error",
            "pooled_text_wrong_output": "conditioning_cosine"}[plant] in caught, caught
    assert pd.notna(values.value).all()
