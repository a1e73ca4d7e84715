"""Format math (engine/quant/formats) against torchao's pure-PyTorch reference functions, bit for bit, plus the
SQNR each format reaches and what each planted layout bug does to it (ANCHORS section 4).

The planted-bug tests monkeypatch the module-level functions a gate-level test would patch, and read the weight
back through the quantized linear (what a model holds), so they also prove the patch reaches the module:
  nibble order        engine.quant.formats.e2m1.unpack                 (every dequantize, NVFP4 and MXFP4)
  block-scale layout  engine.quant.formats.nvfp4.block_scale_layout    (once per tensor, when a module is built)
  global scale        engine.quant.formats.nvfp4.dequantize            (wrap it, passing ones for scale_2)
  e4m3 dtype          engine.quant.formats.fp8.DTYPE                   (read by fp8.cast at quantize time)
  MXFP4 exponent      engine.quant.formats.mxfp4.shared_exponent       (weights at build, activations per call)
"""
import pytest
import torch

from engine.quant.formats import e2m1, fp8, mxfp4, nvfp4
from engine.quant.linear import Fp8Linear, LinearOptions, MXFP4Linear, NVFP4Linear

import torchao.prototype.mx_formats as torchao_mx  # a locked test dependency: missing means a broken install, not a skip
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, pack_uint4  # noqa: E402
from torchao.prototype.mx_formats.mx_tensor import to_mx  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import (  # noqa: E402
    NVFP4Tensor, nvfp4_quantize, per_tensor_amax_to_scale,
)


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())).item()


def outlier_weight(seed=0, shape=(256, 512)):
    """N(0, 0.05) with a few heavy input columns and output rows (trained weights look like this), a zero block
    and a negative zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[:, torch.randint(0, shape[1], (4,), generator=g)] *= 8
    w[torch.randint(0, shape[0], (3,), generator=g)] *= 5
    w[5, :64] = 0.0
    w[9, 100] = -0.0
    return w


def random_weight(std=1.0, seed=1):
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(seed)) * std


def _through_module(cls, w):
    return cls.from_float(w, None, (w.shape[0],), torch.float32, LinearOptions()).dequantize_weight()


def nvfp4_roundtrip(w):
    return _through_module(NVFP4Linear, w)


def mxfp4_roundtrip(w):
    return _through_module(MXFP4Linear, w)


def fp8_roundtrip(w):
    return _through_module(Fp8Linear, w)


# --- bit-exactness against torchao ----------------------------------------------------------------------------------
def test_e2m1_encode_matches_torchao_including_ties_and_signed_zero():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, 1e-40, 0.0]
    x = torch.cat([torch.linspace(-8, 8, 20001), torch.tensor(ties), -torch.tensor(ties)])
    assert torch.equal(e2m1.encode(x), f32_to_f4_unpacked(x))
    assert torch.equal(e2m1.decode(torch.arange(8, dtype=torch.uint8)), torch.tensor(e2m1.VALUES))


def test_packing_puts_element_2i_in_the_low_nibble():
    codes = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = e2m1.pack(codes)
    assert torch.equal(packed, pack_uint4(codes))
    assert torch.equal(packed[0, 0], codes[0, 0] | (codes[0, 1] << 4))
    assert torch.equal(e2m1.unpack(packed), codes)
    assert torch.equal(e2m1.swap_nibbles(e2m1.swap_nibbles(packed)), packed)
    assert torch.equal(e2m1.unpack(e2m1.swap_nibbles(packed))[:, 0::2], codes[:, 1::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_codes_and_scales_bit_identical_to_torchao(dtype):
    """torchao's two-level scaling uses the same global scale as ModelOpt, amax / (448 * 6)."""
    w = outlier_weight().to(dtype)
    packed, scale, scale_2 = nvfp4.quantize(w)
    global_ref = per_tensor_amax_to_scale(w.abs().amax())
    scale_ref, packed_ref = nvfp4_quantize(w.contiguous(), 16, global_ref)
    assert torch.equal(scale_2, global_ref)
    assert torch.equal(scale.view(torch.uint8), scale_ref.view(torch.uint8))
    assert torch.equal(packed, packed_ref.view(torch.uint8))
    # Dequantization multiplies in a different order ((codes * scale) * scale_2 here, exact then one rounding;
    # codes * (scale_2 * scale) in torchao): equal to 1 ulp.
    ref = NVFP4Tensor.to_nvfp4(w.contiguous(), per_tensor_scale=global_ref).dequantize(torch.float32)
    torch.testing.assert_close(nvfp4.dequantize(packed, scale, scale_2), ref, rtol=2**-23, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_codes_and_scales_bit_identical_to_torchao_floor_mode(dtype):
    w = outlier_weight().to(dtype)
    scale_ref, packed_ref = to_mx(w.contiguous(), torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR)
    packed, scale = mxfp4.quantize(w)
    assert torch.equal(packed, packed_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref.view(torch.uint8))


def test_mxfp4_floor_rule_clips_between_6x_and_8x():
    """amax 7.5: e = floor(log2 7.5) - 2 = 0, X = 1, so 7.5 clips to 6 while 5.9 rounds to 6 and 3.1 to 3."""
    block = torch.zeros(1, 32)
    block[0, :3] = torch.tensor([7.5, 5.9, 3.1])
    packed, scale = mxfp4.quantize(block)
    assert scale.item() == mxfp4.BIAS
    assert mxfp4.dequantize(packed, scale)[0, :3].tolist() == [6.0, 6.0, 3.0]


def test_fp8_cast_saturates_instead_of_nan():
    x = torch.tensor([500.0, -1e6, 448.0, 464.1, float("inf"), -float("inf"), 1e-9])
    y = fp8.cast(x).float()
    assert not y.isnan().any()
    assert y.tolist()[:6] == [448.0, -448.0, 448.0, 448.0, 448.0, -448.0]


def test_fp8_zero_rows_and_tokens_stay_finite():
    x = torch.zeros(3, 32)
    x[1] = torch.linspace(-2, 2, 32)
    codes, scale = fp8.quantize_rows(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(fp8.dequantize_rows(codes, scale)[0], torch.zeros(32))
    assert scale[1].item() == pytest.approx(2 / 448)


# --- accuracy -------------------------------------------------------------------------------------------------------
def test_weight_sqnr_floors_and_ordering_with_outliers():
    w = outlier_weight()
    s_fp8, s_nv, s_mx = sqnr(w, fp8_roundtrip(w)), sqnr(w, nvfp4_roundtrip(w)), sqnr(w, mxfp4_roundtrip(w))
    assert s_fp8 >= 28 and s_nv >= 17 and s_mx >= 15, (s_fp8, s_nv, s_mx)  # measured 32.6 / 20.5 / 16.8
    assert s_fp8 > s_nv >= s_mx


def test_weight_sqnr_on_random_matches_the_anchors():
    """ANCHORS section 4 measured 31.6 / 20.4 / 18.8 dB on a random 256x512 weight."""
    w = random_weight()
    assert sqnr(w, fp8_roundtrip(w)) == pytest.approx(31.6, abs=0.3)
    assert sqnr(w, nvfp4_roundtrip(w)) == pytest.approx(20.4, abs=0.3)
    assert sqnr(w, mxfp4_roundtrip(w)) == pytest.approx(18.8, abs=0.3)


# --- planted layout bugs, at the function level ---------------------------------------------------------------------
def test_planted_nibble_swap(monkeypatch):
    w = random_weight()
    monkeypatch.setattr(e2m1, "unpack", lambda p: torch.stack([p >> 4, p & 0xF], dim=-1).flatten(-2))
    assert sqnr(w, nvfp4_roundtrip(w)) == pytest.approx(-3.0, abs=0.5)
    assert sqnr(w, mxfp4_roundtrip(w)) == pytest.approx(-3.0, abs=0.5)  # the same unpack serves MXFP4


def test_planted_block_scales_transposed(monkeypatch):
    w = random_weight()
    monkeypatch.setattr(nvfp4, "block_scale_layout", lambda scale, n, k: scale.reshape(k // nvfp4.BLOCK, n).t())
    assert sqnr(w, nvfp4_roundtrip(w)) == pytest.approx(9.2, abs=1.0)
    assert sqnr(outlier_weight(), nvfp4_roundtrip(outlier_weight())) < 5  # outlier rows make it far worse


def test_planted_global_scale_dropped(monkeypatch):
    w = random_weight(std=0.02)
    real = nvfp4.dequantize
    monkeypatch.setattr(nvfp4, "dequantize", lambda p, s, s2: real(p, s, torch.ones_like(s2)))
    assert sqnr(w, nvfp4_roundtrip(w)) == pytest.approx(-89.4, abs=1.5)  # scales with the weights' magnitude


def test_planted_e5m2_for_e4m3(monkeypatch):
    w = random_weight()
    monkeypatch.setattr(fp8, "DTYPE", torch.float8_e5m2)
    assert fp8.quantize_rows(w)[0].dtype == torch.float8_e5m2
    assert sqnr(w, fp8_roundtrip(w)) == pytest.approx(25.6, abs=0.3)


@pytest.mark.parametrize("delta,min_drop", [(1, 1.5), (-1, 6.0)])
def test_planted_mxfp4_exponent_off_by_one(monkeypatch, delta, min_drop):
    """+1 halves the code range used (lost precision, ~2 dB); -1 clips every block's top values (~8 dB)."""
    w = random_weight()
    good = sqnr(w, mxfp4_roundtrip(w))
    real = mxfp4.shared_exponent
    monkeypatch.setattr(mxfp4, "shared_exponent", lambda amax: real(amax) + delta)
    assert sqnr(w, mxfp4_roundtrip(w)) <= good - min_drop
