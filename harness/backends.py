"""Backends the harness can run, by name. Each maps a RunConfig to a Runner (engine.api)."""
from __future__ import annotations

from typing import Callable

from engine.api import RunConfig, Runner


def _engine(cfg: RunConfig) -> Runner:
    from engine.runner import open_runner

    return open_runner(cfg)


def _diffusers(cfg: RunConfig) -> Runner:
    from reference.flux1 import BACKENDS as FLUX1
    from reference.qwen_image import BACKENDS as QWEN_IMAGE  # family registration (issue 9)

    references = {**FLUX1, **QWEN_IMAGE}
    if cfg.family not in references:
        raise ValueError(f"no diffusers reference for family {cfg.family!r}; valid: {sorted(references)}")
    return references[cfg.family](cfg)


# Imports are deferred so that `parity gate` and `parity --help` do not pay for torch model code.
BACKENDS: dict[str, Callable[[RunConfig], Runner]] = {"engine": _engine, "diffusers": _diffusers}


def open_backend(name: str, cfg: RunConfig) -> Runner:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {sorted(BACKENDS)}")
    return BACKENDS[name](cfg)
