"""The engine's Z-Image DiT against diffusers' ZImageTransformer2DModel on the tiny zoo: same weights, same per-sample
lists in and out, bit for bit on CPU in fp32 and bf16 (one caption, a key-masked batch of two lengths, two equal
lengths)."""
import pytest
import torch
from diffusers import ZImageTransformer2DModel

import engine.pipelines.z_image as zpipe
import reference.z_image as zref
from engine.loading import CheckpointError, load_model, read_checkpoint
from engine.models import z_image as Z
from harness import metrics as M


@pytest.fixture(scope="module")
def tiny_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("z-image", "tiny", seed=0, root=zoo_root)


def _models(folder, dtype):
    ref = ZImageTransformer2DModel.from_pretrained(folder / "transformer", dtype=dtype).eval()
    cfg = Z.ZImageConfig.from_diffusers(dict(ref.config))
    ours = load_model(lambda: Z.ZImageTransformer(cfg), Z.diffusers_key_map(cfg),
                      read_checkpoint(folder / "transformer"), dtype, "cpu")
    return ref, ours


def _inputs(dtype, cap_lens, grid=(16, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, *grid, generator=g).to(dtype) for _ in cap_lens]
    caps = [torch.randn(n, 16, generator=g).to(dtype) for n in cap_lens]
    return x, torch.tensor([0.3] * len(cap_lens)), caps


# 16x20 latents: 80 image tokens, padded with 16 x_pad_tokens to 96; 37 / 70 caption tokens padded to 64 / 96,
# so the batch of two also needs the key mask (64 vs 96); 33 is one past a multiple of 32 (31 cap_pad_tokens).
CASES = {"one-caption": [37], "two-captions-masked": [37, 70], "equal-lengths": [33, 33]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_transformer_matches_diffusers(tiny_dir, dtype, case, one_thread):
    ref, ours = _models(tiny_dir, dtype)
    x, t, caps = _inputs(dtype, CASES[case])
    with torch.no_grad():
        want = ref(x, t, caps, return_dict=False)[0]
        got = ours(x, t, caps)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape == x[0].shape
        assert torch.equal(g, w), (g.float() - w.float()).abs().max()


def test_pad_tokens_and_rope_offset_matter(tiny_dir, one_thread):
    """The pads and the caption-dependent image positions are part of the computation: zeroing the pad tokens or
    shifting the image's frame position moves the output (a model that ignored them would pass a weaker test)."""
    _, ours = _models(tiny_dir, torch.float32)
    x, t, caps = _inputs(torch.float32, [33])
    with torch.no_grad():
        base = ours(x, t, caps)[0]
        ours.x_pad_token.zero_()
        no_pad = ours(x, t, caps)[0]
    assert M.cosine(no_pad[None], base[None])[0] < 0.9999
    layout = ours.layout((1, 16, 20), [33])
    assert layout.image_freqs.shape == (1, 96, 12) and layout.cap_freqs.shape == (1, 64, 12)
    ids = Z.image_positions((1, 8, 10), 64)
    assert ids[0].tolist() == [65, 0, 0] and ids[79].tolist() == [65, 7, 9] and ids[80:].abs().sum() == 0
    assert Z.caption_positions(64)[:2].tolist() == [[1, 0, 0], [2, 0, 0]]


def test_rope_beyond_axes_lens_is_a_clear_error(tiny_dir):
    _, ours = _models(tiny_dir, torch.float32)
    with pytest.raises(ValueError, match="beyond axes_lens"):
        ours.layout((1, 16, 20), [1100])


def test_config_refuses_variants_it_does_not_implement():
    with pytest.raises(ValueError, match="Omni"):
        Z.ZImageConfig.from_diffusers({"siglip_feat_dim": 8})
    with pytest.raises(ValueError, match="one patch size"):
        Z.ZImageConfig.from_diffusers({"all_patch_size": [2, 4], "all_f_patch_size": [1, 1]})
    with pytest.raises(ValueError, match="axes_dims"):
        Z.ZImageConfig.from_diffusers({"dim": 64, "n_heads": 4, "axes_dims": [8, 4, 8], "axes_lens": [8, 8, 8]})


def test_loading_rejects_a_checkpoint_that_does_not_match(tiny_dir):
    ckpt = read_checkpoint(tiny_dir / "transformer")
    cfg = Z.ZImageConfig.from_diffusers(ZImageTransformer2DModel.load_config(tiny_dir / "transformer"))
    ckpt.pop("cap_pad_token")
    with pytest.raises(CheckpointError, match="cap_pad_token"):
        load_model(lambda: Z.ZImageTransformer(cfg), Z.diffusers_key_map(cfg), ckpt, torch.float32, "cpu")


def test_key_map_packs_w1_then_w3_for_the_quant_name_mapping():
    from engine.quant.names import packed_from_key_map, resolve_ignored

    cfg = Z.ZImageConfig.from_diffusers(dict(dim=64, n_heads=4, n_layers=2, n_refiner_layers=1, cap_feat_dim=16,
                                             axes_dims=[8, 4, 4], axes_lens=[64, 8, 8]))
    packed = packed_from_key_map(Z.diffusers_key_map(cfg), None)
    assert packed["layers.0.feed_forward.w13"].sources == ("layers.0.feed_forward.w1", "layers.0.feed_forward.w3")
    names = list(packed)
    assert resolve_ignored(["layers.0.feed_forward.w3"], names, packed) == {"layers.0.feed_forward.w13"}
    assert resolve_ignored(["layers.1.attention.to_k"], names, packed) == {"layers.1.attention.to_qkv"}


def test_reference_helpers_agree_with_the_engine():
    """reference/z_image.py keeps its own copies of the layout and CFG helpers (it reaches the engine only through
    engine.api): they must agree, or the engine and the reference would be compared in different layouts."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 16, 6, 10, generator=g)
    assert torch.equal(zpipe.pack(lat), zref.pack(lat))
    assert torch.equal(zpipe.unpack(zpipe.pack(lat), 6, 10), lat)
    caps = [torch.randn(5, 4, generator=g), torch.randn(9, 4, generator=g)]
    for a, b in zip(zpipe.caption_tensors(caps), zref.caption_tensors(caps)):
        assert torch.equal(a, b)
    pos, neg = torch.randn(2, 16, 1, 6, 10, generator=g), torch.randn(2, 16, 1, 6, 10, generator=g)
    for norm in (0.0, 1.0, 3.0):
        assert torch.equal(zpipe.guide(pos, neg, 4.0, norm), zref.guide(list(pos), list(neg), 4.0, norm))
    assert zpipe.CFG_NORMALIZATION == zref.CFG_NORMALIZATION


def test_schedule_matches_the_scheduler():
    """Z-Image's sigmas: torch's float32 linspace, then the scheduler's shift, bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from harness.zoo.z_image import SCHEDULER

    for steps in (2, 3, 8, 50):
        sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=0.7)
        assert torch.equal(zpipe.z_image_sigmas(steps, 96, SCHEDULER), sched.sigmas)
    dynamic = dict(SCHEDULER, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched = FlowMatchEulerDiscreteScheduler(**dynamic)
    from engine.sampling.flow_match import shift_mu

    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / 5, 5).tolist(), mu=shift_mu(80, dynamic))
    assert torch.equal(zpipe.z_image_sigmas(5, 80, dynamic), sched.sigmas)


def test_bench_inputs_run_both_sides(one_thread):
    """`parity bench` on the seam: the family's bench_inputs through engine.api.build_denoiser and through the
    reference's DENOISERS class built on meta (the per-sample lists from the tensors)."""
    from engine.api import OptimizeSpec, bench_inputs, bench_shape, build_denoiser
    from harness.zoo import synthesize_transformer_state_dict, transformer_config
    from reference.registry import reference

    tcfg = transformer_config("z-image", "tiny")
    inputs = bench_inputs("z-image", "transformer", tcfg, bench_shape(height=80, width=96, text_tokens=7, batch=2),
                          torch.bfloat16, "cpu")
    sd = synthesize_transformer_state_dict("z-image", "tiny", dtype=torch.bfloat16)
    _, engine_forward = build_denoiser("z-image", "transformer", tcfg, sd, "none", OptimizeSpec(), "sp1",
                                       torch.bfloat16, "cpu")
    with torch.device("meta"):
        ref = reference("z-image").DENOISERS["transformer"](**tcfg)
    ref.load_state_dict(sd, assign=True, strict=True)
    with torch.no_grad():
        want = ref.eval()(**inputs, return_dict=False)[0]
        got = engine_forward(inputs)
    assert got.shape == inputs["x"].shape
    assert torch.equal(got, want)


def test_full_size_key_map_covers_the_checkpoint():
    """Full-size Z-Image-Turbo on the meta device: every diffusers tensor reaches exactly one engine tensor with the
    right shape (fused ones stacked along rows), and both have ANCHORS' 6.2B parameters."""
    from harness.zoo import transformer_config

    tcfg = transformer_config("z-image", "full")
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(**tcfg)
        cfg = Z.ZImageConfig.from_diffusers(tcfg)
        ours = Z.ZImageTransformer(cfg)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    key_map = Z.diffusers_key_map(cfg)
    assert set(key_map) == set(mine)
    for name, sources in key_map.items():
        assert mine[name][0] == sum(theirs[s][0] for s in sources), name
        assert all(theirs[s][1:] == mine[name][1:] for s in sources), name
    assert sorted(s for sources in key_map.values() for s in sources) == sorted(theirs)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) and 6.1e9 < count < 6.2e9


def test_zoo_folder_loads_without_missing_or_unexpected_keys(tiny_dir, tmp_path):
    """The tiny folder is what ZImagePipeline's components expect, and building it again gives the same bytes."""
    from transformers import Qwen3Model

    from harness.zoo import build

    _, info = Qwen3Model.from_pretrained(tiny_dir / "text_encoder", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _, info = ZImageTransformer2DModel.from_pretrained(tiny_dir / "transformer", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    again = build("z-image", tmp_path / "again", "tiny", seed=0)
    for sub in ("transformer", "text_encoder", "vae"):
        for f in sorted((tiny_dir / sub).iterdir()):
            assert f.read_bytes() == (again / sub / f.name).read_bytes(), f
