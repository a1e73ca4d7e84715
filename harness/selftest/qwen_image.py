"""Qwen-Image and Qwen-Image-Edit's planted bugs (issue 16), run against harness/suites/qwen.toml's cells by
`parity selftest --suite qwen`. The same mechanism as FLUX.1's catalogue (harness/selftest/plants.py): each plant
patches one product name from TARGETS, from outside; product code never knows. tests/test_qwen_image_pipeline.py
plants the same bugs in a unit test (one forward pass per family instead of a sweep)."""
from __future__ import annotations

import dataclasses

import torch

from harness.selftest.plants import Patcher, Plant, catalogue

TARGETS = {
    "qwen_true_cfg": "engine.pipelines.qwen_image:true_cfg",
    "qwen_negative_prompt": "engine.pipelines.qwen_image:negative_prompt",
    "qwen_edit_negative_conditions": "engine.pipelines.qwen_image:QwenImageEditPipeline.negative_conditions",
    "qwen_axis_frequencies": "engine.models.qwen_image:axis_frequencies",
    "qwen_text": "engine.pipelines.qwen_image:QwenImagePipeline.text",
}

CFG_FP32 = ("/fp32/none/sp1+truecfg/",)


def wrong_dim_rescale(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """The norm rescale over the token axis (dim 1) instead of each token's channels (dim -1)."""
    comb = neg + scale * (pos - neg)
    return comb * (torch.norm(pos, dim=1, keepdim=True) / torch.norm(comb, dim=1, keepdim=True))


def bf16_frequencies(positions: torch.Tensor, dim: int, theta) -> torch.Tensor:
    """RoPE angles computed in bf16 (the reference keeps float32): wrong by ~1e-2 rad at positions of a few hundred."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=positions.device).to(torch.float32).div(dim))
    angles = torch.outer(positions.to(torch.bfloat16), inv.to(torch.bfloat16)).float()
    return torch.polar(torch.ones_like(angles), angles)


def _negative_always_given(p: Patcher):
    # true_cfg_scale > 1 alone switches CFG on, with an empty negative prompt (diffusers needs both).
    p.set("qwen_negative_prompt", lambda sampling: sampling.negative_prompt if sampling.negative_prompt is not None
          else ("" if sampling.true_cfg_scale > 1 else None))


def _negative_text_of_the_prompt(p: Patcher):
    """The negative branch encoded from the positive prompts' text (a cached-embedding mix-up): CFG then pushes
    away from nothing. Only the negative branch is wrong, so before issue 16 the single-step rows (conditional
    branch only) could not see it."""
    last: dict = {}  # the positive prompts of the current generate(): encoded first, then the negative

    def make(text):
        def wrong(self, prompts, sampling, image=None):
            if sampling.negative_prompt is not None and list(prompts) == [sampling.negative_prompt] * len(prompts):
                prompts = last.get("prompts", prompts)
            else:
                last["prompts"] = list(prompts)
            return text(self, prompts, sampling, image)
        return wrong
    p.wrap("qwen_text", make)


def _no_negative(cell):
    return dataclasses.replace(cell.sampling, true_cfg_scale=4.0, negative_prompt=None)


CATALOGUE: dict[str, Plant] = {
    **catalogue(
        "qwen-image",
        Plant("qwen_norm_rescale_wrong_dim", "pipeline", "true-CFG norm rescale over the token axis, not per token",
              CFG_FP32, lambda p: p.set("qwen_true_cfg", wrong_dim_rescale)),
        Plant("qwen_true_cfg_without_negative_prompt", "pipeline",
              "true CFG runs with true_cfg_scale > 1 and no negative prompt (diffusers requires both)",
              ("/fp32/none/sp1/",), _negative_always_given,
              overrides={"sampling": _no_negative}),
        Plant("qwen_negative_branch_gets_prompt_text", "pipeline",
              "the CFG negative branch fed the positive prompt's text embedding", CFG_FP32,
              _negative_text_of_the_prompt),
    ),
    **catalogue(
        "qwen-image-edit",
        Plant("qwen_edit_negative_without_condition_image", "pipeline",
              "Edit's negative branch run without the condition image", CFG_FP32,
              lambda p: p.set("qwen_edit_negative_conditions", lambda self, conditions: (None, []))),
        Plant("qwen_edit_rope_in_bf16", "dit", "Edit's RoPE frequencies computed in bf16 instead of float32",
              ("/fp32/none/sp1/", "/bf16/none/sp1/"), lambda p: p.set("qwen_axis_frequencies", bf16_frequencies),
              known_gap="in the bf16 cell only the exactness tier sees it (single-step cosine ~0.99996, inside "
                        "the bf16 floors); the fp32 cell's floors catch it"),
    ),
}
