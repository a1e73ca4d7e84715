"""`parity sensitivity` on the tiny zoo: a planted quantization-sensitive layer ranks first and is kept in bf16, the
advice holds on held-out seeds and equals what a run given the advised --quant-ignored-layers computes, and the
synthesized-weights path (the one full-size GPU runs take) works on CPU."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from harness import metrics as M
from harness import zoo
from harness.zoo import flux1
from harness.cli import main
from harness.sensitivity import SensitivityConfig, group_of, load_advice, run_sensitivity
from harness.suites import SuiteError, load_suite

PLANTED = "transformer_blocks.1.ff.net.2"  # diffusers name; the engine's double_blocks.1.img_mlp.fc2
PLANTED_ENGINE = "double_blocks.1.img_mlp.fc2"
HOLDOUT = (7,)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    """The smoke suite's prompts and FLUX.1 sampling, one seed to choose with, two steps."""
    smoke = load_suite("smoke")
    path = tmp_path_factory.mktemp("suite") / "sens.toml"
    path.write_text(f"""name = "sens"
prompts = {json.dumps(list(smoke.prompts))}
seeds = [0]
[defaults]
size = "tiny"
device = "cpu"
quant = "none"
parallel = "sp1"
steps = 2
height = 64
width = 64
guidance = 3.5
true_cfg_scale = 1.0
max_sequence_length = 32
[[matrix]]
model = "flux1"
dtype = "bf16"
""")
    return path


@pytest.fixture(scope="module")
def planted_dir(zoo_root):
    return zoo.cached_build("flux1", "tiny", seed=0, root=zoo_root, sensitive_layer=PLANTED)


@pytest.fixture(scope="module")
def runs(planted_dir, tiny_flux_dir, suite_file, tmp_path_factory):
    cache = {}

    def run(quant, model_dir=planted_dir, **kw):
        key = (quant, str(model_dir), tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("sens") / "run"
            cfg = SensitivityConfig(family="flux1", quant=quant, model_dir=str(model_dir), suite=str(suite_file),
                                    holdout_seeds=HOLDOUT, **kw)
            cache[key] = (run_sensitivity(cfg, out, log=lambda *_: None), out)
        return cache[key]
    return run


def test_zoo_plant_is_data_only_and_recorded(planted_dir, tiny_flux_dir):
    plain = zoo.synthesize_transformer_state_dict("flux1", "tiny")
    planted = zoo.synthesize_transformer_state_dict("flux1", "tiny", sensitive_layer=PLANTED)
    changed = sorted(k for k in plain if not torch.equal(plain[k], planted[k]))
    assert changed == ["transformer_blocks.1.ff.net.0.proj.bias", "transformer_blocks.1.ff.net.2.weight"]
    bias = planted["transformer_blocks.1.ff.net.0.proj.bias"] - plain["transformer_blocks.1.ff.net.0.proj.bias"]
    (channel,) = torch.nonzero(bias).flatten().tolist()
    assert bias[channel] == flux1.MASSIVE_ACTIVATION and not planted["transformer_blocks.1.ff.net.2.weight"][:, channel].any()
    assert json.loads((planted_dir / zoo.MARKER).read_text())["sensitive_layer"] == PLANTED
    assert "sensitive_layer" not in json.loads((tiny_flux_dir / zoo.MARKER).read_text())
    with pytest.raises(ValueError, match="cannot make 'transformer_blocks.1.attn.to_q' sensitive"):
        zoo.synthesize_transformer_state_dict("flux1", "tiny", sensitive_layer="transformer_blocks.1.attn.to_q")


# Each target sits midway between the planted model all-quantized and the same with the planted layer kept in bf16
# (measured, tiny, bf16, worst sample on seed 0 / held-out seed 7: fp8 0.978 / 0.977 vs 0.9989 / 0.9983, where
# the unplanted model all-quantized is also 0.9989 / 0.9983; nvfp4 0.942 / 0.945 vs 0.973 / 0.970).
TARGETS = {"fp8": 0.99, "nvfp4": 0.96}


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_planted_layer_ranks_first_and_is_kept_in_bf16(runs, quant):
    target = TARGETS[quant]
    advice, out = runs(quant, target_cosine=target)
    assert advice["ranking"][0]["group"] == PLANTED_ENGINE
    assert advice["ignored"] == [PLANTED]
    # Measured on held-out seeds: the advice reaches the target that all-quantized misses.
    assert advice["holdout_reached"] and advice["holdout_worst_cosine_advised"] >= target
    assert advice["holdout_worst_cosine_all_quantized"] < target
    nbytes = advice["weight_bytes"]
    assert nbytes["all_quantized"] < nbytes["advised"] < nbytes["bf16"]
    assert advice["bytes_kept_in_bf16"] == advice["ranking"][0]["cost_bytes"] > 0
    summary = (out / "summary.md").read_text()
    assert f"--quant-ignored-layers {PLANTED}" in summary and "Bytes saved vs bf16" in summary


def test_results_are_long_format_with_provenance(runs):
    advice, out = runs("fp8", target_cosine=TARGETS["fp8"])
    df = pd.read_parquet(out / "results.parquet")
    for column in ("group", "layer", "config", "split", "seed", "prompt_idx", "denoiser", "metric", "value", "status",
                   "model_hash", "parity_git", "torch_version", "diffusers_version", "quant", "dtype"):
        assert column in df, column
    assert (df.status == "ok").all()
    only = df[(df.config == "only") & (df.metric == "cosine")]
    n_layers = df[df.metric == "weight_sqnr_db"].layer.nunique()
    assert n_layers == 26 and len(only) == n_layers * 2  # one row per group x seed x prompt
    assert not only.duplicated(["group", "seed", "prompt_idx"]).any()
    planted = df[(df.layer == PLANTED_ENGINE) & (df.metric == "act_channel_outlier")].value
    others = df[(df.layer != PLANTED_ENGINE) & (df.metric == "act_channel_outlier")].value
    assert planted.min() > 1000 * others.max()


def test_control_without_the_plant_keeps_nothing(runs, tiny_flux_dir):
    """The same layer on the unplanted zoo: fp8 meets the target all-quantized, and the layer is not first."""
    advice, _ = runs("fp8", model_dir=tiny_flux_dir, target_cosine=TARGETS["fp8"])
    assert advice["ignored"] == [] and advice["holdout_reached"]
    assert advice["ranking"][0]["group"] != PLANTED_ENGINE


def test_advised_cosine_is_what_a_run_with_the_ignored_layers_gives(runs, planted_dir, suite_file):
    """Headline numbers come from the swap-built probe; a runner loaded as a sweep cell loads it, given the advised
    patterns, must compute the same output."""
    from engine.api import RunConfig
    from harness.backends import open_backend

    advice, out = runs("fp8", target_cosine=TARGETS["fp8"])
    suite = load_suite(str(suite_file))
    cfg = RunConfig(family="flux1", model_dir=str(planted_dir), prompts=suite.prompts, seed=HOLDOUT[0], steps=2,
                    dtype="bf16")
    plain = open_backend("engine", cfg)
    inputs = plain.generate(cfg).step0_inputs
    ref = plain.transformer_forward(inputs)
    quant = open_backend("engine", cfg.replace(quant="fp8", quant_ignored=tuple(advice["ignored"])))
    cosine = M.cosine(quant.transformer_forward(inputs), ref)
    df = pd.read_parquet(out / "results.parquet")
    rows = df[(df.group == "<advice>") & (df.config == "advised") & (df.split == "holdout") & (df.metric == "cosine")]
    np.testing.assert_allclose(rows.sort_values("prompt_idx").value.to_numpy(), cosine, rtol=0, atol=1e-9)


def test_suite_cell_reads_stored_advice(runs, tmp_path, suite_file):
    advice, out = runs("fp8", target_cosine=TARGETS["fp8"])
    text = suite_file.read_text().replace('dtype = "bf16"', 'dtype = "bf16"\nquant = "fp8"\nquant_ignored_from = "advice.json"')
    (tmp_path / "advice.json").write_text((out / "advice.json").read_text())
    (tmp_path / "s.toml").write_text(text)
    (cell,) = load_suite(str(tmp_path / "s.toml")).cells
    assert cell.quant_ignored == (PLANTED,)
    assert load_suite(str(tmp_path / "s.toml")).with_device("cpu").cells[0].quant_ignored == (PLANTED,)
    (tmp_path / "s.toml").write_text(text.replace('quant = "fp8"', 'quant = "nvfp4-wo"'))
    with pytest.raises(SuiteError, match="advises quant mode 'fp8', the cell runs 'nvfp4-wo'"):
        load_suite(str(tmp_path / "s.toml"))
    with pytest.raises(ValueError, match="does not exist"):
        load_advice(tmp_path / "missing.json", "fp8")


def test_synthesized_path_on_cpu_is_the_gpu_path(suite_file, tmp_path, capsys):
    """What `--size full --device cuda` runs, at tiny size on CPU: weights synthesized on the device, inputs from
    the zoo, grouped by kind. An unreachable target (1.0: only an unquantized model has cosine 1) exits 1, report
    written; a reachable one exits 0."""
    args = ["sensitivity", "--model", "flux1", "--size", "tiny", "--device", "cpu", "--quant", "fp8", "--group",
            "kind", "--suite", str(suite_file), "--holdout-seeds", "7"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    advice = json.loads((tmp_path / "a" / "advice.json").read_text())
    assert advice["model_hash"].startswith("zoo:flux1-tiny-seed0") and advice["group"] == "kind"
    assert {r["group"] for r in advice["ranking"]} == {group_of(n, "kind") for n in (
        "double_blocks.0.img_mod", "double_blocks.0.txt_mod", "double_blocks.0.img_qkv", "double_blocks.0.txt_qkv",
        "double_blocks.0.img_out", "double_blocks.0.txt_out", "double_blocks.0.img_mlp.fc1",
        "double_blocks.0.img_mlp.fc2", "double_blocks.0.txt_mlp.fc1", "double_blocks.0.txt_mlp.fc2",
        "single_blocks.0.mod", "single_blocks.0.linear1", "single_blocks.0.linear2")}
    assert "--quant-ignored-layers" in capsys.readouterr().out or advice["ignored"] == []
    assert main(args + ["--target-cosine", "1.0", "--out", str(tmp_path / "b")]) == 1
    assert (tmp_path / "b" / "results.parquet").is_file()


@pytest.mark.parametrize("bad, message", [
    (["--quant", "int4"], "unknown quant mode 'int4'"),
    (["--quant", "fp8", "--group", "row"], "unknown --group 'row'"),
    (["--quant", "fp8", "--model-dir", "/nonexistent"], "not a diffusers model folder"),
    (["--quant", "fp8", "--holdout-seeds", "0"], "held-out seeds [0] are also the suite's seeds"),
])
def test_bad_input_exits_2_and_writes_nothing(bad, message, suite_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sensitivity", "--model", "flux1", "--suite", str(suite_file), "--out", str(out)] + bad)
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_groups_whose_patterns_miss_their_layers_are_refused(monkeypatch):
    """Planted: pattern derivation that reaches more than the group (a whole block for one layer). The check that
    every group's patterns reach exactly its layers must refuse it rather than advise a wrong list."""
    from engine.api import RunConfig, sensitivity_probe
    from harness import sensitivity

    cfg = RunConfig(family="flux1", model_dir="", prompts=("p",), dtype="bf16", quant="fp8")
    probe = sensitivity_probe(cfg, lambda d: (zoo.transformer_config("flux1", "tiny"),
                                              zoo.synthesize_transformer_state_dict("flux1", "tiny")))
    assert len(sensitivity.make_groups(probe, "layer")) == 26
    monkeypatch.setattr(sensitivity, "_candidate_patterns", lambda layers, grouping: ["transformer_blocks.1"])
    with pytest.raises(RuntimeError, match="no --quant-ignored-layers patterns reach exactly group"):
        sensitivity.make_groups(probe, "layer")
