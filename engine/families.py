"""The engine's registry of model families: name -> engine.family.Family. The only generic module that names a
family; adding one is its own files (engine/models/<family>.py, engine/pipelines/<family>.py) plus one line here."""
from __future__ import annotations

from engine.family import Family, TokenFamily
from engine.pipelines import flux1, gemma4_unified, ideogram4, qwen_image, wan, z_image

FAMILIES: dict[str, Family] = {
    "flux1": flux1.FAMILY,
    "qwen-image": qwen_image.FAMILY,
    "qwen-image-edit": qwen_image.EDIT_FAMILY,
    "z-image": z_image.FAMILY,
    "wan": wan.A14B_FAMILY,
    "wan-ti2v": wan.TI2V_FAMILY,
    "ideogram4": ideogram4.FAMILY,
}


def _check_registry() -> None:
    for name, fam in FAMILIES.items():
        if fam.name != name:
            raise ValueError(f"engine family registered as {name!r} calls itself {fam.name!r}")
    pipelines = [f.diffusers_pipeline for f in FAMILIES.values()]
    if dupes := sorted({p for p in pipelines if pipelines.count(p) > 1}):
        raise ValueError(f"two engine families claim the diffusers pipeline(s) {dupes}")


_check_registry()


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"the engine has no model family {name!r}; valid: {sorted(FAMILIES)}") from None


def family_of_pipeline(class_name: str | None) -> Family:
    """The family whose folders carry this model_index.json `_class_name`."""
    for fam in FAMILIES.values():
        if fam.diffusers_pipeline == class_name:
            return fam
    known = sorted(f.diffusers_pipeline for f in FAMILIES.values())
    raise ValueError(f"no engine family loads diffusers pipeline {class_name!r}; known: {known}")


# Families whose output is tokens (engine.family.TokenFamily): compared by token-logits metrics.
TOKEN_FAMILIES: dict[str, TokenFamily] = {
    "gemma4-unified": gemma4_unified.FAMILY,
}


def token_family(name: str) -> TokenFamily:
    try:
        return TOKEN_FAMILIES[name]
    except KeyError:
        raise ValueError(f"the engine has no token model family {name!r}; valid: {sorted(TOKEN_FAMILIES)}") from None
