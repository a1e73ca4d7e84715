"""The engine's Wan DiT against diffusers' WanTransformer3DModel, and the engine's UniPC sampler against diffusers'
UniPCMultistepScheduler. Tiny configs (ANCHORS section 1 with 4 heads), weights drawn per expert, fp32 on CPU:
both are bit for bit equal, so the tests assert equality (the issue's floors, cosine >= 0.99999 and 1e-6 per step,
are implied)."""
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from engine.loading import load_model
from engine.models import wan as W
from engine.sampling.unipc import UniPCConfig, UniPCSampler, flow_schedule
from harness import metrics as M

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, ffn_dim=32, num_layers=2, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# A14B's two experts share one architecture and differ in weights; TI2V-5B is one expert with more channels.
EXPERTS = {"transformer": (TINY, 0), "transformer_2": (TINY, 1), "ti2v": (dict(TINY, in_channels=6, out_channels=6), 2)}


def _pair(config: dict, seed: int):
    ref = WanTransformer3DModel(**config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    cfg = W.WanConfig.from_diffusers(dict(ref.config))
    ours = load_model(lambda: W.WanTransformer(cfg), W.diffusers_key_map(cfg), ref.state_dict(), torch.float32, "cpu")
    return ref, ours


@pytest.fixture(scope="module")
def pairs():
    return {name: _pair(config, seed) for name, (config, seed) in EXPERTS.items()}


def _inputs(channels: int, frames: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, frames, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)


@pytest.mark.parametrize("expert", EXPERTS)
def test_transformer_matches_diffusers(pairs, expert, one_thread):
    ref, ours = pairs[expert]
    x, text = _inputs(ref.config.in_channels)
    tokens = 5 * 4 * 4
    per_token = torch.full((2, tokens), 700)
    per_token[:, :16] = 0  # the first latent frame's tokens at t = 0: TI2V's image-conditioned layout
    with torch.no_grad():
        for t in (torch.tensor([999, 501]), per_token):
            want = ref(x, t, text, return_dict=False)[0]
            got = ours(x, t, text)
            assert got.shape == want.shape == x.shape
            assert torch.equal(got, want), (got - want).abs().max()


def test_temporal_rope_and_per_token_time_matter(pairs, one_thread, monkeypatch):
    """Frames after the first moved one latent frame along the temporal RoPE axis, and the zeroed first-frame
    timestep, each move the output (a model that ignored them would pass a weaker test). Shifting every frame alike
    would not: RoPE is relative, so a uniform offset cancels in q.k."""
    _, ours = pairs["ti2v"]
    x, text = _inputs(6)
    t = torch.full((2, 80), 700)
    plain = W.token_rope

    def gap_after_first_frame(tables, grid, dims):
        f, h, w = grid
        cos, sin = plain(tables, (f + 1, h, w), dims)
        keep = torch.cat([torch.arange(h * w), torch.arange(2 * h * w, (f + 1) * h * w)])
        return cos[keep], sin[keep]
    with torch.no_grad():
        base = ours(x, t, text)
        t0 = t.clone()
        t0[:, :16] = 0
        zeroed = ours(x, t0, text)
        monkeypatch.setattr(W, "token_rope", gap_after_first_frame)
        ours._rope = None
        shifted = ours(x, t, text)
    # Both paths are bitwise deterministic, so any difference is the change itself (random tiny weights keep the
    # RoPE effect small: cosine 0.999997; the per-token time moves it to ~0.75).
    assert (shifted - base).abs().max() > 1e-3
    assert M.cosine(zeroed.flatten(1), base.flatten(1)).max() < 0.9


def test_config_refuses_variants_it_does_not_implement():
    with pytest.raises(ValueError, match="image-to-video"):
        W.WanConfig.from_diffusers(dict(TINY, image_dim=32, added_kv_proj_dim=32))
    with pytest.raises(ValueError, match="qk_norm"):
        W.WanConfig.from_diffusers(dict(TINY, qk_norm="rms_norm"))
    _, ours = _pair(TINY, 0)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        ours.grid((40, 8, 8))


def test_full_configs_match_the_published_parameter_counts():
    """The engine's size table and the zoo's full folders (meta-device builds): 14.3B per A14B expert, 5.0B TI2V."""
    from harness.zoo import transformer_config

    for name, family, denoisers, billions in (("a14b", "wan", ("transformer", "transformer_2"), 14.3),
                                              ("ti2v-5b", "wan-ti2v", ("transformer",), 5.0)):
        with torch.device("meta"):
            model = W.WanTransformer(W.SIZES[name])
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 1) == billions
        for denoiser in denoisers:
            assert W.WanConfig.from_diffusers(transformer_config(family, "full", denoiser)) == W.SIZES[name]


# --- UniPC ------------------------------------------------------------------------------------------------------------
# Flow shifts of Wan 2.2's scheduler configs (A14B 12.0, TI2V-5B 5.0) and diffusers' default 3.0; one and two steps
# (the order ramp's edges); order 3 reaches the general linear solve.
SCHEDULES = [(12.0, 4, 2), (5.0, 6, 2), (3.0, 5, 3), (12.0, 1, 2), (12.0, 2, 2)]


@pytest.mark.parametrize("shift,steps,order", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unipc_matches_diffusers_step_by_step(shift, steps, order, dtype):
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                  num_train_timesteps=1000, solver_order=order)
    ref.set_timesteps(steps)
    ours = UniPCSampler(steps, UniPCConfig.from_scheduler_config(dict(ref.config)))
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 4, 3, 4, 4, generator=g, dtype=dtype)
    y = x.clone()
    for t in ref.timesteps:
        v = torch.randn(x.shape, generator=g, dtype=dtype)  # identical model outputs on both sides
        x = ref.step(v, t, x, return_dict=False)[0]
        y = ours.step(v, y)
        assert y.dtype == x.dtype and torch.equal(y, x), (y - x).abs().max()  # max abs diff 0 <= 1e-6


def test_unipc_is_not_euler_and_refuses_what_it_does_not_implement():
    """The corrector and the second-order terms are live: a 3-step run differs from first order (solver_order 1)."""
    g = torch.Generator().manual_seed(0)
    x, vs = torch.randn(1, 4, 8, generator=g), [torch.randn(1, 4, 8, generator=g) for _ in range(3)]
    outs = []
    for order in (1, 2):
        s, y = UniPCSampler(3, UniPCConfig(flow_shift=5.0, solver_order=order)), x
        for v in vs:
            y = s.step(v, y)
        outs.append(y)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="flow_prediction"):
        UniPCConfig.from_scheduler_config(dict(prediction_type="epsilon"))
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        UniPCConfig.from_scheduler_config(dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                               use_karras_sigmas=True))
    assert flow_schedule(2, UniPCConfig(flow_shift=12.0))[1].tolist() == [999, 923]


def test_rope_stores_each_half_in_the_inputs_dtype_with_the_float32_products_bits():
    """engine.models.wan.apply_rope writes its float32 products straight into x's dtype (one conversion per half,
    as the reference) instead of stacking them in float32 first: the same bits, in bf16 and fp32."""
    torch.manual_seed(0)
    cos, sin = (t.float() for t in torch.randn(2, 6, 8))
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 6, 3, 8, dtype=dtype)
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
        want = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(dtype)
        got = W.apply_rope(x, cos, sin)
        assert got.dtype == dtype and torch.equal(got, want)
