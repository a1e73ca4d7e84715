"""parity selftest: a catalogue of planted bugs, installed from outside the product and run through the sweep and
the gate by harness.selftest.runner. Each catalogue is a family's own file (one of them also plants the harness's
own bugs, on its cells); the mechanism is harness/selftest/plants.py; this module is the registry: one entry per
family.

    install("rope_axes_swapped")   -> an undo function (in-process use: tests, the selftest runner)
    sitecustomize_source("padded") -> the body of a sitecustomize.py that installs it in torchrun ranks only
"""
from __future__ import annotations

from typing import Callable

from harness.selftest import flux1, gemma4_unified, ideogram4, qwen_image, wan, z_image
from harness.selftest.plants import Patcher, Plant

# The registry: family -> its catalogue module (TARGETS, CATALOGUE).
FAMILY_CATALOGUES = {
    "flux1": flux1,
    "qwen-image": qwen_image,
    "z-image": z_image,
    "wan": wan,
    "ideogram4": ideogram4,
    "gemma4-unified": gemma4_unified,
}


def _merge(attr: str) -> dict:
    out: dict = {}
    for module in FAMILY_CATALOGUES.values():
        for key, value in getattr(module, attr).items():
            if key in out:
                raise ValueError(f"{attr} {key!r} of {module.__name__} is already defined by another catalogue")
            out[key] = value
    return out


TARGETS: dict[str, str] = _merge("TARGETS")
CATALOGUE: dict[str, Plant] = _merge("CATALOGUE")


def plant(name: str) -> Plant:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ValueError(f"unknown plant {name!r}; valid: {sorted(CATALOGUE)}") from None


def install(name: str) -> Callable[[], None]:
    """Install one plant in this process; returns the undo."""
    patcher = Patcher(TARGETS)
    try:
        plant(name).install(patcher)
    except BaseException:
        patcher.undo()
        raise
    return patcher.undo


def sitecustomize_source(name: str, repo_root: str) -> str:
    """A sitecustomize.py that installs `name` in torchrun ranks only (RANK is set there, never in the sweep)."""
    plant(name)  # unknown names fail here, not silently in a rank
    return ("import os, sys\n"
            "if 'RANK' in os.environ:  # only the torchrun ranks, never the sweep process\n"
            f"    sys.path.insert(0, {repo_root!r})\n"
            "    from harness.selftest import install\n"
            f"    install({name!r})\n")


__all__ = ["CATALOGUE", "TARGETS", "Patcher", "Plant", "install", "plant", "sitecustomize_source"]
