"""The catalogue of planted bugs: small, realistic mistakes an engine or harness change could make, each installed
from outside by patching one product function or attribute, so product code never knows about the plant.

Every product name a plant touches is spelled once, in TARGETS (module path : attribute path): when code moves,
update the path there. An entry is declarative: what it breaks, which suite cells show it (substrings of cell names,
as `parity sweep --cells` takes them), where it must be installed (this process, the torchrun ranks, or both) and
the cell fields it needs changed (an odd token count for the uneven-shard plant).

The mechanism (Plant, Patcher) is harness/selftest/plants.py; installing by name is the registry's
(harness/selftest/__init__.py: install, sitecustomize_source).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from harness.selftest.plants import Patcher, Plant, catalogue

# ---------------------------------------------------------------- every product name a plant reaches, in one place
TARGETS = {
    # FLUX.1 DiT
    "rope_frequencies": "engine.models.flux1:rope_frequencies",
    "timestep_scale": "engine.models.flux1:TIMESTEP_SCALE",
    "conditioning": "engine.models.flux1:Flux1Transformer.conditioning",
    "modulate": "engine.models.flux1:modulate",
    # The model's kernel comes from the attention backend table at optimize() time (engine.optimize), not from the
    # name the model module imports: a plant on that name would never run.
    "attention_backends": "engine.attention:BACKENDS",
    "rms_norm_forward": "engine.models.common:RMSNorm.forward",
    "mlp_forward": "engine.models.common:GeluMLP.forward",
    "layer_norm": "engine.models.flux1:layer_norm",
    # pipeline and sampler
    "euler_step": "engine.pipeline:euler_step",
    "flux_sigmas": "engine.pipelines.flux1:dynamic_shift_sigmas",
    "initial_latents": "engine.pipelines.flux1:Flux1Pipeline.initial_latents",
    "encode_prompt": "engine.pipelines.flux1:Flux1Pipeline.encode_prompt",
    "decode_input": "engine.pipelines.flux1:Flux1Pipeline.decode_input",
    "unpack_latents": "engine.pipelines.flux1:unpack_latents",
    "pack_latents": "engine.pipelines.flux1:pack_latents",
    "serial_cfg": "engine.pipelines.flux1:serial_cfg",
    "parallel_cfg_call": "engine.parallel.cfg:ParallelCFG.__call__",
    # quant formats and loading
    "e2m1_unpack": "engine.quant.formats.e2m1:unpack",
    "nvfp4_block_scale_layout": "engine.quant.formats.nvfp4:block_scale_layout",
    "nvfp4_dequantize": "engine.quant.formats.nvfp4:dequantize",
    "fp8_dtype": "engine.quant.formats.fp8:DTYPE",
    "fp8_quantize_rows": "engine.quant.formats.fp8:quantize_rows",
    "fp8_linear_forward": "engine.quant.linear:Fp8Linear.forward",
    "mxfp4_shared_exponent": "engine.quant.formats.mxfp4:shared_exponent",
    "quant_handlers": "engine.quant.api:HANDLERS",
    "nvfp4_act_qdq": "engine.quant.formats.nvfp4:quantize_dequantize",
    "nvfp4_from_checkpoint": "engine.quant.linear:NVFP4Linear.from_checkpoint",
    "prequantized_resolve_ignored": "engine.quant.prequantized:resolve_ignored",
    # parallel schemes
    "shard_positions": "engine.parallel.transformer:shard_positions",
    "plan_shards": "engine.parallel.transformer:plan_shards",
    "shard_plan": "engine.parallel.sharding:ShardPlan",
    "assert_replicated": "engine.parallel.transformer:assert_replicated",
    # sp_overlap: the cut of the single-stream linear1 into row GEMMs, and the work handed to the Ulysses attention
    "flux1_linear_rows": "engine.models.flux1:linear_rows",
    "beside_work": "engine.parallel.attention:BesideWork",
    # the harness itself
    "metric_cosine": "harness.metrics:cosine",
    "metric_psnr": "harness.metrics:psnr_db",
    "metric_ssim": "harness.metrics:ssim",
    "metric_mad": "harness.metrics:mean_abs_diff",
    "threshold_ops": "harness.thresholds:OPS",
    "backends": "harness.backends:BACKENDS",
    "rows_add": "harness.sweep:Rows.add",
}


FP32 = ("/fp32/none/sp1/",)
BF16 = ("/bf16/none/sp1/",)


# ---------------------------------------------------------------- FLUX.1 DiT
def _rope_axes_swapped(p: Patcher):
    p.wrap("rope_frequencies", lambda f: lambda ids, axes, theta: f(ids[:, [0, 2, 1]], axes, theta))


def _guidance_dropped(p: Patcher):
    def make(f):
        def conditioning(self, timestep, guidance, pooled):
            embedder, self.guidance_in = self.guidance_in, None
            try:
                return f(self, timestep, guidance, pooled)
            finally:
                self.guidance_in = embedder
        return conditioning
    p.wrap("conditioning", make)


def _attention_scale(p: Patcher):
    # softmax(QK^T / d) instead of / sqrt(d): q pre-scaled by 1/sqrt(d) before the kernel's own scaling
    sdpa = p.get("attention_backends")["sdpa"]
    p.setitem("attention_backends", "sdpa", lambda q, k, v: sdpa(q * q.shape[-1] ** -0.5, k, v))


def _gelu_exact(p: Patcher):
    p.set("mlp_forward", lambda self, x: self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def _rope_theta(p: Patcher):
    p.wrap("rope_frequencies", lambda f: lambda ids, axes, theta: f(ids, axes, theta / 10))


# ---------------------------------------------------------------- pipeline and sampler
def _pooled_wrong_output(p: Patcher):
    def make(f):
        def encode_prompt(self, prompts, max_sequence_length):
            embeds, _, txt_ids = f(self, prompts, max_sequence_length)
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            bos = self.text_encoder(ids.to(self.device)).last_hidden_state[:, 0]  # BOS token, not the EOS pool
            return embeds, bos.to(self.dtype), txt_ids
        return encode_prompt
    p.wrap("encode_prompt", make)


def _t5_embeddings_scaled(p: Patcher):
    """The T5 prompt embeddings 1% too large: the tiny DiT's output barely moves (its text path is weak), so only the
    step-0 conditioning comparison (harness/conditioning.py) sees it off the CPU's exactness tier."""
    def make(f):
        def encode_prompt(self, prompts, max_sequence_length):
            embeds, pooled, txt_ids = f(self, prompts, max_sequence_length)
            return embeds * 1.01, pooled, txt_ids
        return encode_prompt
    p.wrap("encode_prompt", make)


def _vae_shift_dropped(p: Patcher):
    def decode_input(self, latents, h, w):
        return p_unpack(latents, h, w) / self.vae.config.scaling_factor
    p_unpack = p.get("unpack_latents")
    p.set("decode_input", decode_input)


def _vae_scaling_inverted(p: Patcher):
    def decode_input(self, latents, h, w):
        cfg = self.vae.config
        return p_unpack(latents, h, w) * cfg.scaling_factor + cfg.shift_factor
    p_unpack = p.get("unpack_latents")
    p.set("decode_input", decode_input)


def _pack_transposed(p: Patcher):
    def pack(x):  # tokens in column-major order: (w, h) patches where the model expects (h, w)
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 4, 2, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    p.set("pack_latents", pack)


def _cfg_branches_swapped(p: Patcher):
    def swapped(call):
        def run(*args):
            cond, uncond = call(*args)
            return uncond, cond
        return run
    p.wrap("serial_cfg", swapped)
    p.wrap("parallel_cfg_call", lambda f: lambda self, cond, uncond: swapped(f)(self, cond, uncond))


# ---------------------------------------------------------------- quant formats and loading
def _nibbles_swapped(p: Patcher):
    from engine.quant.formats.e2m1 import swap_nibbles
    p.wrap("e2m1_unpack", lambda f: lambda packed, *a, **k: f(swap_nibbles(packed), *a, **k))


def _global_scale_dropped(p: Patcher):
    p.wrap("nvfp4_dequantize", lambda f: lambda q, s, s2, *a, **k: f(q, s, torch.ones_like(s2), *a, **k))


def _fp8_act_per_tensor(p: Patcher):
    per_token = p.get("fp8_quantize_rows")

    def per_tensor(x):  # one scale for the whole activation, broadcast to the per-row layout the matmul takes
        import engine.quant.formats.fp8 as fp8
        scale = (x.abs().amax().float().clamp(min=fp8.MIN_AMAX) / fp8.MAX).expand(x.shape[0], 1).contiguous()
        return (x.float() / scale).clamp(-fp8.MAX, fp8.MAX).to(fp8.DTYPE), scale

    def make(forward):
        def run(self, x):  # activations only: weights were quantized at load, per row, as before
            import engine.quant.formats.fp8 as fp8
            fp8.quantize_rows = per_tensor
            try:
                return forward(self, x)
            finally:
                fp8.quantize_rows = per_token
        return run
    p.wrap("fp8_linear_forward", make)


def _nvfp4_act_not_quantized(p: Patcher):
    p.set("nvfp4_act_qdq", lambda x, scale_2: x)


def _input_scale_ignored(p: Patcher):
    original = p.get("nvfp4_from_checkpoint").__func__

    def from_checkpoint(cls, parts, bias, dtype, options):  # the static scale read, then dropped: dynamic per call
        return original(cls, [{k: v for k, v in part.items() if k != "input_scale"} for part in parts], bias, dtype,
                        options)
    p.set("nvfp4_from_checkpoint", classmethod(from_checkpoint))


def _input_scale_inverted(p: Patcher):
    original = p.get("nvfp4_from_checkpoint").__func__

    def from_checkpoint(cls, parts, bias, dtype, options):  # amax / 2688 read as its reciprocal
        return original(cls, [{k: 1.0 / v if k == "input_scale" else v for k, v in part.items()} for part in parts],
                        bias, dtype, options)
    p.set("nvfp4_from_checkpoint", classmethod(from_checkpoint))


def _weight_only_quantizes_activations(mode: str) -> Callable[[Patcher], None]:
    def install(p: Patcher):  # the mode's handler says W4A4: every linear it builds quantizes its input too
        p.setitem("quant_handlers", mode, dataclasses.replace(p.get("quant_handlers")[mode], act=True))
    return install


def _ignored_layers_not_applied_on_load(p: Patcher):
    # The pre-quantized loader forgets --quant-ignored-layers (preflight still resolves them, so the run starts).
    p.set("prequantized_resolve_ignored", lambda patterns, linears, packed=None: set())


# ---------------------------------------------------------------- parallel schemes (torchrun ranks)
def _rope_offset(p: Patcher):
    p.wrap("shard_positions", lambda f: lambda plan, ids, dim, index: f(plan, ids.roll(1, dims=dim), dim, index))


def _padded(p: Patcher):
    base = p.get("shard_plan")

    @dataclass(frozen=True)
    class PaddedPlan(base):  # uneven tail zero-padded to equal shards, no key mask
        real_total: int = 0

        def shard(self, x, dim, index):
            pad = list(x.shape)
            pad[dim] = self.total - x.shape[dim]
            return super().shard(torch.cat([x, x.new_zeros(pad)], dim), dim, index)

        def gather(self, local, dim, group):
            return super().gather(local, dim, group).narrow(dim, 0, self.real_total)

    def plan(total, parts):
        size = -(-total // parts)
        return PaddedPlan(total=size * parts, sizes=(size,) * parts, real_total=total)
    p.set("plan_shards", plan)


def _cfg_noise(p: Patcher):
    import torch.distributed as dist
    p.wrap("initial_latents", lambda f: lambda self, batch, h, w, seed: f(self, batch, h, w, seed + dist.get_rank()))


def _cfg_noise_unguarded(p: Patcher):
    _cfg_noise(p)
    p.set("assert_replicated", lambda *a, **k: None)  # also silence the guard, to see what the metrics see


# ---------------------------------------------------------------- parallel schemes: the sp_overlap switch
def _mlp_rows_off_by_one(p: Patcher):  # every MLP piece one row early: the last QKV row in, its own last row out
    p.wrap("flux1_linear_rows", lambda f: lambda lin, lo, hi: f(lin, lo - 1, hi - 1) if lo else f(lin, lo, hi))


def _beside_work_reversed(p: Patcher):  # the work handed to the attention back to front: results in the wrong order
    p.wrap("beside_work", lambda cls: lambda work: cls(list(work)[::-1]))


# ---------------------------------------------------------------- the harness itself
def _cosine_of_abs(p: Patcher):
    p.wrap("metric_cosine", lambda f: lambda t, r, **k: f(torch.as_tensor(t).abs(), torch.as_tensor(r).abs(), **k))


def _psnr_wrong_range(p: Patcher):
    from skimage.metrics import peak_signal_noise_ratio

    def psnr(test, ref):  # data_range 4x too large: +12 dB for every image, capped like the real one
        import numpy as np
        return np.asarray([100.0 if np.array_equal(t, r) else min(100.0, peak_signal_noise_ratio(
            r, t, data_range=1020)) for t, r in zip(test, ref)], dtype=np.float64)
    p.set("metric_psnr", psnr)


def _ssim_self(p: Patcher):
    p.wrap("metric_ssim", lambda f: lambda test, ref: f(ref, ref))  # compares the reference with itself


def _mad_signed(p: Patcher):
    import numpy as np

    def mad(test, ref):  # signed mean: errors of both signs cancel
        d = np.asarray(test, dtype=np.int16) - np.asarray(ref, dtype=np.int16)
        return np.abs(d.reshape(d.shape[0], -1).mean(axis=1, dtype=np.float64))
    p.set("metric_mad", mad)


def _gate_direction_flipped(p: Patcher):
    import operator
    p.setitem("threshold_ops", ">=", operator.le)
    p.setitem("threshold_ops", "<=", operator.ge)


def _thresholds_dead(p: Patcher):
    p.setitem("threshold_ops", ">=", lambda value, threshold: True)
    p.setitem("threshold_ops", "<=", lambda value, threshold: True)


def _reference_is_engine(p: Patcher):
    p.setitem("backends", "diffusers", p.get("backends")["engine"])


def _rows_dropped(p: Patcher):
    def make(add):
        def dropping(self, comparison, metric, compute):
            if metric == "ssim":  # computed, never recorded: the gate sees no SSIM row
                return compute()
            return add(self, comparison, metric, compute)
        return dropping
    p.wrap("rows_add", make)


def _engine_bug_hidden_by(harness_plant: Callable[[Patcher], None]) -> Callable[[Patcher], None]:
    """A lenient harness plant is only dangerous when the engine is wrong: plant both and see the run still fail."""
    def install(p: Patcher):
        harness_plant(p)
        _vae_shift_dropped(p)
    return install


CATALOGUE: dict[str, Plant] = catalogue(
    "flux1",
    # --- FLUX.1 DiT
    Plant("rope_axes_swapped", "dit", "RoPE row and column axes swapped", FP32, _rope_axes_swapped, fast=True),
    Plant("timestep_not_scaled", "dit", "sigma passed to the timestep embedding without the x1000 scale", FP32,
          lambda p: p.set("timestep_scale", 1.0)),
    Plant("guidance_embedding_dropped", "dit", "guidance embedding never added to the modulation vector", FP32,
          _guidance_dropped),
    Plant("modulation_shift_scale_swapped", "dit", "adaLN shift and scale swapped", FP32,
          lambda p: p.wrap("modulate", lambda f: lambda x, shift, scale: f(x, scale, shift))),
    Plant("attention_scale_wrong", "dit", "attention logits scaled by 1/d instead of 1/sqrt(d)", FP32,
          _attention_scale),
    Plant("qk_norm_skipped", "dit", "q/k RMSNorm skipped", FP32, lambda p: p.set("rms_norm_forward", lambda self, x: x)),
    Plant("gelu_exact_not_tanh", "dit", "MLP GELU exact where the model uses the tanh approximation", FP32, _gelu_exact,
          known_gap="passes the fp32 floors (meant for any device: single-step cosine 1 - 6e-9); only the CPU "
          "exactness tier (golden/thresholds.toml, exact = true) catches it, so a GPU run would not"),
    Plant("layer_norm_eps_wrong", "dit", "pre-modulation LayerNorm eps 1e-2 instead of 1e-6", FP32,
          lambda p: p.wrap("layer_norm", lambda f: lambda x, eps=1e-6: f(x, 1e-2))),
    Plant("rope_theta_wrong", "dit", "RoPE theta 1000 instead of 10000", FP32, _rope_theta),
    # --- pipeline and sampler
    Plant("euler_sign_flipped", "pipeline", "Euler update walks against the velocity", FP32,
          lambda p: p.wrap("euler_step", lambda f: lambda x, v, s, sn: f(x, -v, s, sn))),
    Plant("sigma_shift_dropped", "pipeline", "resolution-dependent sigma shift ignored", FP32,
          lambda p: p.wrap("flux_sigmas", lambda f: lambda steps, n, cfg: f(steps, n, {**cfg, "use_dynamic_shifting": False}))),
    Plant("noise_seed_offset", "pipeline", "initial noise drawn from seed + 1", FP32,
          lambda p: p.wrap("initial_latents", lambda f: lambda self, b, h, w, seed: f(self, b, h, w, seed + 1))),
    Plant("pooled_text_wrong_output", "pipeline", "pooled CLIP text taken from the BOS hidden state", FP32,
          _pooled_wrong_output),
    Plant("t5_embeddings_scaled", "pipeline", "T5 prompt embeddings scaled by 1.01", FP32, _t5_embeddings_scaled),
    Plant("vae_shift_factor_dropped", "pipeline", "VAE shift_factor not added before decoding", FP32,
          _vae_shift_dropped, fast=True),
    Plant("vae_scaling_factor_inverted", "pipeline", "latents multiplied by the VAE scaling_factor, not divided",
          FP32, _vae_scaling_inverted),
    Plant("latent_pack_transposed", "pipeline", "2x2 patches packed in column-major token order", FP32,
          _pack_transposed),
    Plant("cfg_branches_swapped", "pipeline", "true-CFG combine with cond and uncond swapped", ("/bf16/none/cfg2",),
          _cfg_branches_swapped, where="both"),
    # --- quant formats and loading paths
    Plant("nvfp4_nibbles_swapped", "quant", "NVFP4 checkpoint nibbles read in the wrong order", ("/nvfp4-ckpt/",),
          _nibbles_swapped),
    Plant("nvfp4_block_scales_transposed", "quant", "NVFP4 block scales read transposed", ("/nvfp4-ckpt/",),
          lambda p: p.set("nvfp4_block_scale_layout", lambda scale, n, k: scale.reshape(k // 16, n).t())),
    Plant("nvfp4_global_scale_dropped", "quant", "NVFP4 per-tensor global scale ignored", ("/nvfp4-ckpt/",),
          _global_scale_dropped),
    Plant("nvfp4_activations_not_quantized", "quant", "NVFP4 W4A4 silently runs weight-only", ("/nvfp4-ckpt/",),
          _nvfp4_act_not_quantized),  # less error, not more: caught by the quant oracle (harness/quant_oracle.py)
    Plant("fp8_as_e5m2", "quant", "fp8 weights stored as e5m2 instead of e4m3", ("/bf16/fp8-wo/sp1/",),
          lambda p: p.set("fp8_dtype", torch.float8_e5m2)),
    Plant("fp8_activation_scale_per_tensor", "quant", "fp8 W8A8 activation scale per tensor, not per token",
          ("/bf16/fp8/sp1/",), _fp8_act_per_tensor),  # inside the end-to-end floors; caught by the quant oracle
    Plant("nvfp4_static_input_scale_ignored", "quant", "NVFP4 checkpoint's calibrated input_scale dropped at load "
          "(activations scaled dynamically)", ("/nvfp4-ckpt-static/",), _input_scale_ignored),
    Plant("nvfp4_static_input_scale_inverted", "quant", "NVFP4 checkpoint's input_scale used as its reciprocal",
          ("/nvfp4-ckpt-static/",), _input_scale_inverted),
    Plant("ignored_layers_quantized_anyway", "quant", "pre-quantized loader ignores --quant-ignored-layers",
          ("/nvfp4-ckpt-static/",), _ignored_layers_not_applied_on_load),
    Plant("mxfp4_exponent_off_by_one", "quant", "MXFP4 shared exponent one too small", ("/mxfp4/", "/mxfp4-wo/"),
          lambda p: p.wrap("mxfp4_shared_exponent", lambda f: lambda *a, **k: f(*a, **k) - 1)),
    # Less weight-only than asked: inside the end-to-end floors (mxfp4's own W4A4 error is); caught by the oracle.
    Plant("mxfp4_wo_activations_quantized", "quant", "MXFP4 weight-only silently quantizes activations (W4A4)",
          ("/mxfp4-wo/",), _weight_only_quantizes_activations("mxfp4-wo")),
    # --- parallel schemes (installed in the torchrun ranks only)
    # ring_text_double_counted (replicated text counted once per ring rank) is Z-Image's (harness/selftest/
    # z_image.py): FLUX.1 cuts its text across the ring's ranks, so its ring cells never replicate text there.
    Plant("rope_shard_offset", "parallel", "each shard's RoPE positions one token early", ("/bf16/none/ulysses2/",),
          _rope_offset, where="ranks"),
    Plant("uneven_tail_padded", "parallel", "uneven shard tail zero-padded with no key mask",
          ("/bf16/none/ring2/",), _padded, where="ranks", overrides={"height": 36, "width": 36}),  # 81 tokens: odd
    Plant("cfg_ranks_different_noise", "parallel", "CFG ranks draw different noise", ("/bf16/none/cfg2",),
          _cfg_noise, where="ranks"),
    Plant("cfg_noise_guard_silenced", "parallel", "CFG ranks draw different noise and the replication guard is off",
          ("/bf16/none/cfg2",), _cfg_noise_unguarded, where="ranks"),
    # In the overlap path only (the eager twin never cuts linear1): optimized_vs_eager, bitwise on CPU, sees them.
    Plant("sp_overlap_mlp_rows_off_by_one", "parallel", "sp_overlap's MLP row GEMMs cut one row early",
          ("sp_overlap",), _mlp_rows_off_by_one, where="ranks"),
    Plant("sp_overlap_work_reordered", "parallel", "sp_overlap's work results come back in reverse order",
          ("sp_overlap",), _beside_work_reversed, where="ranks"),
    # --- the harness: metrics computed leniently, the gate, reference integrity, dropped rows
    Plant("metric_cosine_of_abs", "harness", "cosine computed on absolute values (hides sign errors)", FP32,
          _engine_bug_hidden_by(_cosine_of_abs)),
    Plant("metric_psnr_wrong_range", "harness", "PSNR with data_range 1020 instead of 255 (+12 dB)", FP32,
          _engine_bug_hidden_by(_psnr_wrong_range), fast=True),
    Plant("metric_ssim_against_itself", "harness", "SSIM of the reference against itself (always 1)", FP32,
          _engine_bug_hidden_by(_ssim_self)),
    Plant("metric_mad_signed", "harness", "mean abs diff as |mean of signed differences|", FP32,
          _engine_bug_hidden_by(_mad_signed)),
    Plant("gate_direction_flipped", "harness", "the gate's >= and <= swapped", FP32, _gate_direction_flipped,
          fast=True),
    Plant("gate_thresholds_dead", "harness", "every threshold passes whatever the value", FP32, _thresholds_dead),
    Plant("reference_is_the_engine", "harness", "the diffusers backend replaced by the engine", FP32,
          _reference_is_engine, fast=True),
    Plant("rows_dropped", "harness", "SSIM rows computed but never recorded", FP32, _rows_dropped, fast=True),
)
