"""The engine's Qwen-Image DiT against diffusers' QwenImageTransformer2DModel on the tiny zoo: same weights, same
inputs, bit for bit on CPU (fp32 and bf16), with and without a text padding mask and with a condition image."""
import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from engine.loading import CheckpointError, load_model, read_checkpoint
from engine.models import qwen_image as Q


@pytest.fixture(scope="module")
def tiny_qwen_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("qwen-image", "tiny", seed=0, root=zoo_root)


def _models(folder, dtype):
    ref = QwenImageTransformer2DModel.from_pretrained(folder / "transformer", dtype=dtype).eval()
    cfg = Q.QwenImageConfig.from_diffusers(dict(ref.config))
    ours = load_model(lambda: Q.QwenImageTransformer(cfg), Q.diffusers_key_map(cfg),
                      read_checkpoint(folder / "transformer"), dtype, "cpu")
    return ref, ours


def _inputs(dtype, shapes, batch=2, txt=11, seed=0, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    n = sum(f * h * w for f, h, w in shapes)
    mask = None
    if pad_from is not None:  # the second prompt is shorter: its last tokens are padding
        mask = torch.ones(batch, txt, dtype=torch.long)
        mask[1, pad_from:] = 0
    return dict(hidden_states=torch.randn(batch, n, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(batch, txt, 16, generator=g).to(dtype),
                encoder_hidden_states_mask=mask, timestep=torch.tensor([0.83] * batch).to(dtype),
                img_shapes=[list(shapes)] * batch)


def _forward(ref, ours, x):
    with torch.no_grad():
        want = ref(**x, return_dict=False)[0]
        got = ours(x["hidden_states"], x["encoder_hidden_states"], x["timestep"], x["img_shapes"][0],
                   x["encoder_hidden_states_mask"])
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shapes,pad_from", [([(1, 5, 6)], None), ([(1, 5, 6)], 7), ([(1, 4, 6), (1, 7, 5)], 7)],
                         ids=["image", "padded-text", "edit-condition-image"])
def test_transformer_matches_diffusers_bitwise(tiny_qwen_dir, dtype, shapes, pad_from, one_thread):
    """Odd, non-square token grids (centred RoPE rounds differently for odd sizes); fused QKV, the text mask and a
    second image on frame index 1 must not change a single bit on CPU."""
    ref, ours = _models(tiny_qwen_dir, dtype)
    got, want = _forward(ref, ours, _inputs(dtype, shapes, pad_from=pad_from))
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_rope_tables_stay_float32_under_bf16(tiny_qwen_dir):
    img, txt = Q.rope_tables([(1, 4, 6), (1, 7, 5)], 9, (8, 4, 4), 10000)
    assert img.dtype == txt.dtype == torch.complex64
    assert img.shape == (4 * 6 + 7 * 5, 8) and txt.shape == (9, 8)


def test_config_refuses_variants_it_does_not_implement():
    with pytest.raises(ValueError, match="zero_cond_t"):
        Q.QwenImageConfig.from_diffusers({"zero_cond_t": True})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        Q.QwenImageConfig.from_diffusers({"axes_dims_rope": [8, 4, 8], "attention_head_dim": 16})


def test_loading_rejects_a_checkpoint_that_does_not_match(tiny_qwen_dir):
    ckpt = read_checkpoint(tiny_qwen_dir / "transformer")
    cfg = Q.QwenImageConfig.from_diffusers(QwenImageTransformer2DModel.load_config(tiny_qwen_dir / "transformer"))
    ckpt.pop("txt_norm.weight")
    with pytest.raises(CheckpointError, match="missing keys.*txt_norm.weight"):
        load_model(lambda: Q.QwenImageTransformer(cfg), Q.diffusers_key_map(cfg), ckpt, torch.float32, "cpu")


@pytest.mark.parametrize("family", ["qwen-image", "qwen-image-edit"])
def test_bench_inputs_run_both_sides_bitwise(family, one_thread):
    """`parity bench` on the seam: the family's bench_inputs through engine.api.build_denoiser and through the
    reference's DENOISERS class built on meta (the bench's diffusers side: its RoPE tables rebuilt, img_shapes from
    the tensor) give the same bits on CPU in fp32."""
    from engine.api import OptimizeSpec, bench_inputs, bench_shape, build_denoiser
    from harness.zoo import synthesize_transformer_state_dict, transformer_config
    from reference.registry import reference

    tcfg = transformer_config(family, "tiny")
    inputs = bench_inputs(family, "transformer", tcfg, bench_shape(height=80, width=96, text_tokens=7, batch=2),
                          torch.float32, "cpu")
    sd = synthesize_transformer_state_dict(family, "tiny")
    _, engine_forward = build_denoiser(family, "transformer", tcfg, sd, "none", OptimizeSpec(), "sp1",
                                       torch.float32, "cpu")
    with torch.device("meta"):
        ref = reference(family).DENOISERS["transformer"](**tcfg)
    ref.load_state_dict(synthesize_transformer_state_dict(family, "tiny"), assign=True, strict=True)
    with torch.no_grad():
        want = ref.eval()(**inputs, return_dict=False)[0]
        got = engine_forward(inputs)
    assert got.shape == inputs["hidden_states"].shape[:2] + (tcfg["out_channels"] * 4,)
    assert torch.equal(got, want)
