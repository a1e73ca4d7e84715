"""Z-Image's planted bugs (issue 10), run against harness/suites/zimage.toml's cells by `parity selftest --suite
zimage`. The same mechanism as FLUX.1's catalogue (harness/selftest/plants.py): each plant patches one product name
from TARGETS, from outside; product code never knows. The two sequence-parallel plants are sglang's Z-Image bugs:
the caption sharded with the image instead of replicated (its worst model-output cosine against one GPU was 0.5039),
and the replicated caption's RoPE positions off by one. The third is the generic ring's known silent bug (replicated
text counted once per ring rank), here because Z-Image's ring cell keeps its caption replicated (FLUX.1 now cuts its
text across the ring). They are installed in the torchrun ranks only, so the single-device engine the parallel
cells are compared with stays correct."""
from __future__ import annotations

import torch

from harness.selftest.plants import Patcher, Plant, catalogue

TARGETS = {
    "z_image_guide": "engine.pipelines.z_image:guide",
    "z_image_velocity": "engine.pipelines.z_image:velocity",
    "z_image_embed_caption": "engine.models.z_image:ZImageTransformer.embed_caption",
    "z_image_caption_positions": "engine.models.z_image:caption_positions",
    # generic sequence-parallel attention, reached through Z-Image's ring cell (its caption stays replicated)
    "ring_attention": "engine.parallel.attention:ring_attention",
    "join_joint": "engine.parallel.attention:join_joint",
    "joint_key_mask": "engine.parallel.attention:joint_key_mask",
}

CFG_FP32 = ("/fp32/none/sp1+truecfg/",)
TURBO_FP32 = ("/fp32/none/sp1/",)
SP = ("/bf16/none/ulysses2/", "/bf16/none/ring2/")


def guide_with_w(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float) -> torch.Tensor:
    """The usual CFG form neg + w (pos - neg) with Z-Image's guidance_scale taken as w: Z-Image's s is w - 1, so
    this guides one step less (pos + s (pos - neg) == neg + (s + 1) (pos - neg)). The clamp as the product does."""
    out = []
    for p, n in zip(pos.float(), neg.float()):
        pred = n + scale * (p - n)
        if normalization > 0:
            ceiling = torch.linalg.vector_norm(p) * normalization
            norm = torch.linalg.vector_norm(pred)
            if norm > ceiling:
                pred = pred * (ceiling / norm)
        out.append(pred)
    return torch.stack(out)


def guide_clamped_per_token(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float
                            ) -> torch.Tensor:
    """cfg_normalization against the wrong norm: each latent position's channel norm (Qwen-Image's per-token rescale
    habit) instead of the whole sample's."""
    pos, neg = pos.float(), neg.float()
    pred = pos + scale * (pos - neg)
    if normalization > 0:
        ceiling = torch.linalg.vector_norm(pos, dim=1, keepdim=True) * normalization
        norm = torch.linalg.vector_norm(pred, dim=1, keepdim=True)
        pred = torch.where(norm > ceiling, pred * (ceiling / norm), pred)
    return pred


def _caption_sharded(p: Patcher):
    """Each rank keeps only its contiguous share of the caption tokens (with their RoPE rows and key mask), as if the
    caption were sharded with the image, while the attention still treats it as replicated."""
    def make(embed):
        def sharded(self, caps, layout):
            import torch.distributed as dist

            cap = embed(self, caps, layout)
            if not dist.is_initialized() or dist.get_world_size() == 1:
                return cap
            size, rank = dist.get_world_size(), dist.get_rank()
            length = cap.shape[1]
            lo, hi = rank * length // size, (rank + 1) * length // size
            layout.cap_freqs = layout.cap_freqs[:, lo:hi]
            if layout.cap_keys is not None:
                layout.cap_keys = layout.cap_keys[:, lo:hi]
            return cap[:, lo:hi]
        return sharded
    p.wrap("z_image_embed_caption", make)


def _caption_rope_off_by_one(p: Patcher):
    def make(positions):
        def shifted(cap_len, device=None):
            ids = positions(cap_len, device)
            ids[:, 0] += 1
            return ids
        return shifted
    p.wrap("z_image_caption_positions", make)


def _text_twice(p: Patcher):
    """The replicated caption joined to every travelling K/V block instead of the local block only: its keys enter
    each softmax once per ring rank (the known silent bug, ANCHORS 5: MAE 15/255). A padded caption's mask goes
    with it into every block, so the plant is that one mistake and not also a dropped mask. Calls without text
    (the noise refiner's image-only attention) are left alone: there is nothing to count twice."""
    real, join, mask_of = p.get("ring_attention"), p.get("join_joint"), p.get("joint_key_mask")

    def fake(q, k, v, axis, block_sizes, text_kv, text_first, lse_attention, text_mask=None):
        if text_kv is None:
            return real(q, k, v, axis, block_sizes, None, text_first, lse_attention)
        (tk, tv), t = text_kv, text_kv[0].shape[1]
        attend = lse_attention if text_mask is None else (
            lambda bq, bk, bv: lse_attention(bq, bk, bv, mask_of(text_mask, bk.shape[1] - t, text_first)))
        return real(q, join(tk, k, text_first), join(tv, v, text_first), axis, tuple(s + t for s in block_sizes),
                    None, text_first, attend)
    p.set("ring_attention", fake)


CATALOGUE: dict[str, Plant] = catalogue(
    "z-image",
    Plant("z_image_caption_sharded", "parallel",
          "the caption sharded across sequence-parallel ranks with the image instead of replicated (sglang's bug)",
          SP, _caption_sharded, where="ranks"),
    Plant("z_image_caption_rope_offset", "parallel",
          "the replicated caption's RoPE positions one off under sequence parallelism", SP,
          _caption_rope_off_by_one, where="ranks"),
    Plant("ring_text_double_counted", "parallel", "replicated text K/V counted once per ring rank",
          ("/bf16/none/ring2/",), _text_twice, where="ranks"),
    Plant("z_image_cfg_scale_as_w", "pipeline",
          "CFG's guidance_scale used as w in neg + w (pos - neg) instead of as w - 1 in pos + s (pos - neg)",
          CFG_FP32, lambda p: p.set("z_image_guide", guide_with_w)),
    Plant("z_image_output_not_negated", "pipeline",
          "the transformer's output used as the velocity without negating it", TURBO_FP32,
          lambda p: p.set("z_image_velocity", lambda prediction: prediction), fast=False),
    Plant("z_image_cfg_normalization_wrong_norm", "pipeline",
          "cfg_normalization clamps each latent position's channel norm instead of the whole sample's", CFG_FP32,
          lambda p: p.set("z_image_guide", guide_clamped_per_token)),
)
