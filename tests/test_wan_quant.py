"""fp8 (W8A8) and MXFP4 online quantization reach both A14B experts through the generic quant walk: each denoiser
gets its own quantized linears, and a quantized run stays near the unquantized bf16 engine (tiny zoo, CPU)."""
import pytest
import torch

from engine.api import RunConfig, open_runner
from engine.pipelines.wan import WanSampling
from engine.quant.linear import QuantLinear
from harness import metrics as M
from harness.zoo import cached_build

# Measured (CPU, tiny zoo, 3 steps with the expert switch, seed 0): final-latent cosine vs unquantized bf16 fp8
# 0.999775, mxfp4 0.999503; floors at ~5-7x the measured 1 - cosine.
FLOORS = {"fp8": 0.9985, "mxfp4": 0.9975}
LAYERS = {"fp8": 14, "mxfp4": 2}  # per expert: every block linear; MXFP4 only ffn_in (>= 256 outputs)


@pytest.fixture(scope="module")
def runs(zoo_root, one_thread):
    model_dir = str(cached_build("wan", "tiny", 0, root=zoo_root))
    out = {}
    for quant in ("none", *FLOORS):
        cfg = RunConfig(family="wan", model_dir=model_dir, prompts=("a red fox",), steps=3, height=32, width=32,
                        dtype="bf16", quant=quant, sampling=WanSampling(guidance_scale=4.0, guidance_scale_2=3.0,
                                                                        num_frames=5, max_sequence_length=16))
        runner = open_runner(cfg)
        out[quant] = (runner, runner.generate(cfg))
    return out


@pytest.mark.parametrize("quant", FLOORS)
def test_online_quant_reaches_both_experts(runs, quant):
    runner, art = runs[quant]
    counts = {name: sum(isinstance(m, QuantLinear) for m in getattr(runner, name).modules())
              for name in ("transformer", "transformer_2")}
    assert counts == {"transformer": LAYERS[quant], "transformer_2": LAYERS[quant]}
    assert art.extras["n_quantized_linears"] == 2 * LAYERS[quant]
    cos = M.cosine(art.final_latents, runs["none"][1].final_latents)[0]
    print(f"{quant}: final-latent cosine vs bf16 {cos:.6f}")
    assert FLOORS[quant] <= cos < 1.0  # quantized, and close
