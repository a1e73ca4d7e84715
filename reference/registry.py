"""The reference's registry: family name -> its runner around the pinned diffusers pipeline. The only generic
module of the reference that names a family; adding one is reference/<family>.py plus one line here.

A runner class takes a RunConfig, serves generate(cfg) and transformer_forward(inputs), and names the diffusers
class of each denoiser in DENOISERS (component folder -> class)."""
from __future__ import annotations

from reference.flux1 import Flux1Reference
from reference.gemma4_unified import Gemma4UnifiedReference
from reference.ideogram4 import Ideogram4Reference
from reference.qwen_image import QwenImageEditReference, QwenImageReference
from reference.wan import WanReference, WanTI2VReference
from reference.z_image import ZImageReference

REFERENCES: dict[str, type] = {
    "flux1": Flux1Reference,
    "qwen-image": QwenImageReference,
    "qwen-image-edit": QwenImageEditReference,
    "z-image": ZImageReference,
    "wan": WanReference,
    "wan-ti2v": WanTI2VReference,
    "ideogram4": Ideogram4Reference,
}


def reference(family: str) -> type:
    try:
        return REFERENCES[family]
    except KeyError:
        raise ValueError(f"no diffusers reference for family {family!r}; valid: {sorted(REFERENCES)}") from None


def open_runner(cfg, components=None):
    """The reference runner of cfg.family; `components` (built components by folder name, as engine.api.open_runner
    takes them) replace the folder, for the families whose runner takes them."""
    runner = reference(cfg.family)
    return runner(cfg) if components is None else runner(cfg, components=components)


# Token families (multimodal language models): family -> its runner around the transformers model and processor.
TOKEN_REFERENCES: dict[str, type] = {
    "gemma4-unified": Gemma4UnifiedReference,
}


def token_reference(family: str) -> type:
    try:
        return TOKEN_REFERENCES[family]
    except KeyError:
        raise ValueError(f"no transformers reference for token family {family!r}; valid: {sorted(TOKEN_REFERENCES)}"
                         ) from None
