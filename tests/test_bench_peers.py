"""`parity bench`'s peers on the tiny zoo, on CPU (a build-and-agree check, not a timing): torchao's float8 modes on the
diffusers transformer, and the whole-pipeline modes (engine pipeline next to the diffusers pipeline on in-memory
components). Each check is shown able to fail where a plausible bug would slip past it."""
import sys

import pytest
import torch

from harness import bench_e2e
from harness.bench import parse_ratios, ratio_lines, run_bench
from harness.bench_modes import BenchConfig, parse_mode

TINY = dict(family="flux1", size="tiny", device="cpu", height=32, width=32, text_tokens=8, iters=1, warmup=0,
            steps=2, pipeline_iters=1, pipeline_warmup=0)
MODES = ["diffusers-bf16", "diffusers-bf16+torchao-fp8-wo", "diffusers-bf16+torchao-fp8-wo-blocks",
         "diffusers-bf16+torchao-fp8-rowwise",
         "diffusers-pipeline-bf16", "engine-pipeline-bf16"]


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    """Tiny ops: one thread (conftest's one_thread says why)."""


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    return run_bench(BenchConfig(**TINY), MODES, tmp_path_factory.mktemp("bench"), log=lambda *_: None
                     ).set_index("mode")


@pytest.mark.parametrize("mode, expect", [
    ("diffusers-bf16+torchao-fp8-rowwise", dict(torchao="torchao-fp8-rowwise", compile=None, pipeline=False)),
    ("diffusers-bf16+torchao-fp8-wo+regional", dict(torchao="torchao-fp8-wo", compile="regional", pipeline=False)),
    ("diffusers-pipeline-bf16+regional", dict(torchao=None, compile="regional", pipeline=True)),
    ("diffusers-pipeline-bf16+torchao-fp8-rowwise-blocks+regional",
     dict(torchao="torchao-fp8-rowwise-blocks", compile="regional", pipeline=True)),
    ("engine-pipeline-fp8-wo+compile", dict(quant="fp8-wo", pipeline=True)),
])
def test_modes_parse(mode, expect):
    parsed = parse_mode(mode)
    assert {k: getattr(parsed, k) for k in expect} == expect


@pytest.mark.parametrize("mode, message", [
    ("diffusers-bf16+torchao-fp8-wo+torchao-fp8-rowwise", "at most one of each bracket"),
    ("diffusers-bf16+torchao-int4", "unknown diffusers bench mode"),
    ("diffusers-pipeline-bf16+compile", "whole-forward"),
    ("engine-pipeline-", "unknown bench mode"),
])
def test_bad_modes_fail_before_building(mode, message):
    with pytest.raises(ValueError, match=message):
        parse_mode(mode)


def test_torchao_weight_only_runs_and_is_read_back(frame):
    """float8 weight-only quantizes every linear (read back from the model), holds about half the bf16 bytes (counted
    through torchao's tensor subclass, not the bf16 dtype it reports), and moves the output a little, not not at all."""
    bf16, wo = frame.loc["diffusers-bf16"], frame.loc["diffusers-bf16+torchao-fp8-wo"]
    assert wo["error"] == "" and bf16["n_quantized_linears"] == 0
    assert wo["n_quantized_linears"] > 20  # every linear of the tiny transformer, embedders included
    assert 0.45 < wo["weight_gb"] / bf16["weight_gb"] < 0.6
    assert 0.99 < wo["cosine_vs_first"] < 1.0


def test_torchao_blocks_scope_takes_the_block_linears_only(frame):
    """-blocks quantizes exactly the linears inside the repeated blocks (the engine's default layers), no more."""
    from diffusers import FluxTransformer2DModel

    from harness.zoo import transformer_config

    with torch.device("meta"):
        model = FluxTransformer2DModel(**transformer_config("flux1", "tiny"))
    in_blocks = sum(isinstance(m, torch.nn.Linear) for b in (*model.transformer_blocks, *model.single_transformer_blocks)
                    for m in b.modules())
    all_linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    blocks = frame.loc["diffusers-bf16+torchao-fp8-wo-blocks"]
    assert blocks["error"] == "" and blocks["n_quantized_linears"] == in_blocks < all_linears
    assert frame.loc["diffusers-bf16+torchao-fp8-wo", "n_quantized_linears"] == all_linears


def test_torchao_rowwise_on_cpu_is_an_error_row_saying_why(frame):
    """torchao's dynamic rowwise float8 needs CUDA sm89+: on CPU its row says so, and the run goes on."""
    row = frame.loc["diffusers-bf16+torchao-fp8-rowwise"]
    assert "compute capability" in row["error"] and row["median_ms"] != row["median_ms"]  # NaN
    assert frame.loc["engine-pipeline-bf16", "error"] == ""


def test_pipeline_modes_agree_on_the_same_weights(frame):
    """The engine's pipeline against the diffusers pipeline on shared in-memory components: bf16 on CPU they agree
    to the bit (identical images: PSNR at its cap)."""
    ref, eng = frame.loc["diffusers-pipeline-bf16"], frame.loc["engine-pipeline-bf16"]
    assert ref["error"] == eng["error"] == "" and eng["baseline"] == "diffusers-pipeline-bf16"
    assert ref["denoiser"] == eng["denoiser"] == "pipeline" and eng["steps"] == 2
    assert eng["cosine_vs_first"] == 1.0 and eng["psnr_vs_first"] == 100.0
    assert eng["weight_gb"] == pytest.approx(ref["weight_gb"], rel=0.01)


def test_pipeline_comparison_sees_different_weights(tmp_path, monkeypatch):
    """Plant: the second pipeline mode gets its denoiser from another seed. The comparison must show it (a bench
    comparing a pipeline with itself, or ignoring the weights it was given, would still read 1.0)."""
    real, calls = bench_e2e.synthesize_transformer_state_dict, []

    def planted(*args, **kwargs):
        calls.append(1)
        return real(*args, **dict(kwargs, seed=kwargs["seed"] + len(calls) - 1))
    monkeypatch.setattr(bench_e2e, "synthesize_transformer_state_dict", planted)
    out = run_bench(BenchConfig(**TINY), ["diffusers-pipeline-bf16", "engine-pipeline-bf16"], tmp_path,
                    log=lambda *_: None).set_index("mode")
    assert out.loc["engine-pipeline-bf16", "error"] == ""
    assert out.loc["engine-pipeline-bf16", "cosine_vs_first"] < 0.9
    assert out.loc["engine-pipeline-bf16", "psnr_vs_first"] < 30


def test_missing_torchao_is_an_error_row_naming_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import torchao...` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao", None)
    out = run_bench(BenchConfig(**dict(TINY, iters=1)), ["diffusers-bf16", "diffusers-bf16+torchao-fp8-wo"],
                    tmp_path, log=lambda *_: None).set_index("mode")
    assert out.loc["diffusers-bf16", "error"] == ""
    assert "needs the torchao package" in out.loc["diffusers-bf16+torchao-fp8-wo", "error"]


def test_torchao_inductor_flags_do_not_leak(frame):
    """torchao's quantize_ turns on inductor's coordinate-descent tuning process-wide; the bench restores the config
    after every mode, so the modes after a torchao one compile as they would alone."""
    import torch._inductor.config as inductor
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    assert inductor.coordinate_descent_tuning is False  # the frame's torchao modes ran before this line
    try:  # the hazard is real: outside the bench, quantize_ flips it
        quantize_(torch.nn.Sequential(torch.nn.Linear(32, 32)).to(torch.bfloat16), Float8WeightOnlyConfig())
        assert inductor.coordinate_descent_tuning is True
    finally:
        inductor.coordinate_descent_tuning = False


def test_ratios(frame):
    pairs = parse_ratios(["engine-pipeline-bf16:diffusers-pipeline-bf16"], MODES)
    [line] = ratio_lines(frame.reset_index(), pairs)
    assert line.startswith("pipeline: engine-pipeline-bf16 / diffusers-pipeline-bf16 = ") and "1.00000 / 1.00000" in line
    with pytest.raises(ValueError, match="not one of this run's --modes"):
        parse_ratios(["engine-bf16:diffusers-bf16"], MODES)


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_in_memory_pipeline_equals_the_folder(backend, tiny_flux_dir):
    """The components the bench builds in memory are the zoo folder's (CPU, fp32): the same generation to the bit,
    through the engine's and the reference's `components` hooks alike."""
    from engine.api import RunConfig, denoiser_weights, open_runner
    from harness.zoo import pipeline_components, synthesize_transformer_state_dict, transformer_config
    from reference.registry import open_runner as reference_runner

    opener = open_runner if backend == "engine" else reference_runner
    cfg = RunConfig("flux1", str(tiny_flux_dir), prompts=("a red fox",), steps=2, height=32, width=32)
    components = dict(pipeline_components("flux1", "tiny"), transformer=denoiser_weights(
        transformer_config("flux1", "tiny"), synthesize_transformer_state_dict("flux1", "tiny")))
    memory_cfg = cfg.replace(model_dir="<in memory>")
    folder = opener(cfg).generate(cfg)
    memory = opener(memory_cfg, components).generate(memory_cfg)
    assert torch.equal(folder.final_latents, memory.final_latents)
    assert (folder.images == memory.images).all()


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "engine-bf16:diffusers-bf16"], "not one of this run's --modes"),
    (["--ratio", "diffusers-bf16"], "expected MODE:PEER"),
    (["--pipeline-iters", "0"], "pipeline_iters must be >= 1"),
])
def test_cli_bad_bench_input_exits_2(extra, message, tmp_path, capsys):
    from harness.cli import main

    argv = ["bench", "--family", "flux1", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path / "b"),
            "--modes", "diffusers-bf16", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "b").exists()
