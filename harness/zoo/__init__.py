"""The model zoo: deterministic synthetic diffusers-format model folders, and full-size weights made on the fly.

A family is a module in FAMILIES with this interface:
    SIZES: tuple[str, ...]
    transformer_config(size, denoiser) -> dict                 a denoiser's diffusers constructor arguments
    transformer_specs(size, denoiser, sensitive_layer=None) -> list[synth.ParamSpec]  that denoiser's tensors, from
                                                               a meta-device build (denoiser: its component folder)
    write(folder, size, seed, dtype=None, sensitive_layer=None) -> None     every component, into an empty folder
    denoiser_inputs(size, denoiser, prompt_seeds, seed, height, width, text_tokens, sampling) -> dict  step-0 inputs
and optionally
    pipeline_components(size, seed, device, dtype) -> dict     every non-denoiser component built in memory, weights
                                                               synthesized on `device` (a full-size pipeline bench)
`sensitive_layer` names one layer that gets a planted massive input activation (a quantization hazard, nothing else).
Everything here is generic: no family names below FAMILIES.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from harness.zoo import flux1, gemma4_unified, ideogram4, qwen_image, synth, wan, z_image

# Bump whenever synthesis, configs or tokenizers change what a build writes: it keys the cached builds.
ZOO_VERSION = "1"
MARKER = "parity_zoo.json"  # written into every folder, last before publishing

FAMILIES = {
    "flux1": flux1,
    "qwen-image": qwen_image.IMAGE,
    "qwen-image-edit": qwen_image.EDIT,
    "z-image": z_image,
    "wan": wan.A14B,
    "wan-ti2v": wan.TI2V,
    "ideogram4": ideogram4,
    "gemma4-unified": gemma4_unified,
}


def _family(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown zoo family {family!r}; valid families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


def _sized(family: str, size: str):
    fam = _family(family)
    if size not in fam.SIZES:
        raise ValueError(f"unknown size {size!r} for zoo family {family!r}; valid sizes: {', '.join(fam.SIZES)}")
    return fam


def transformer_config(family: str, size: str, denoiser: str = "transformer") -> dict:
    """The diffusers config dict (constructor arguments) of the family's denoiser (component folder name) at `size`."""
    return _sized(family, size).transformer_config(size, denoiser)


def synthesize_transformer_state_dict(family: str, size: str = "tiny", seed: int = 0, device="cpu",
                                      dtype: torch.dtype = torch.float32, denoiser: str = "transformer",
                                      sensitive_layer: str | None = None) -> dict[str, torch.Tensor]:
    """The transformer's full state dict, synthesized tensor by tensor directly on `device` (no CPU copy, no disk).

    On CPU in float32 it equals the transformer weights `build` writes for the same (family, size, seed). On CUDA a
    CUDA generator draws the values: deterministic, but different from the CPU values (see synth's docstring)."""
    fam = _sized(family, size)
    return synth.synthesize(fam.transformer_specs(size, denoiser, sensitive_layer), seed, denoiser, device=device,
                            dtype=dtype)


def denoiser_inputs(family: str, size: str, denoiser: str, **kwargs) -> dict[str, torch.Tensor]:
    """Synthesized step-0 inputs of one denoiser (diffusers names), for runs without text encoders."""
    return _sized(family, size).denoiser_inputs(size, denoiser, **kwargs)


def pipeline_components(family: str, size: str, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32
                        ) -> dict:
    """The family's pipeline components other than its denoisers, built in memory on `device` (folder name ->
    object; the scheduler as its config dict), for engine.api.open_runner and the reference runner's `components`."""
    fam = _sized(family, size)
    if not hasattr(fam, "pipeline_components"):
        able = sorted(name for name, f in FAMILIES.items() if hasattr(f, "pipeline_components"))
        raise ValueError(f"the zoo cannot build {family!r} pipeline components in memory; families it can: {able}")
    return fam.pipeline_components(size, seed, device, dtype)


def drawn_on(draw_device: str | None) -> str | None:
    """What decides the values of a folder drawn on `draw_device`: None for the CPU (the reference values), else
    the GPU model (CUDA generators give other values than the CPU's, and may differ between GPU models)."""
    if draw_device is None or torch.device(draw_device).type == "cpu":
        return None
    device = torch.device(draw_device)
    if device.type != "cuda":
        raise ValueError(f"cannot draw zoo weights on {draw_device!r}; valid: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"cannot draw zoo weights on {draw_device!r}: no CUDA device is visible to torch")
    return f"cuda:{torch.cuda.get_device_name(device)}"


def _provenance(family: str, size: str, seed: int, dtype, sensitive_layer: str | None = None,
                drawn: str | None = None) -> dict:
    import diffusers
    import transformers

    # No timestamps or paths: two builds of the same inputs must be byte-identical, this file included.
    return {
        "family": family, "size": size, "seed": seed, "zoo_version": ZOO_VERSION,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        # Only when planted, so that every plain folder (and its hash, which goldens record) stays as it was.
        **({"sensitive_layer": sensitive_layer} if sensitive_layer else {}),
        **({"drawn_on": drawn} if drawn else {}),
    }


def _nonempty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def build(family: str, out_dir, size: str = "tiny", seed: int = 0, *, overwrite: bool = False,
          dtype: torch.dtype | None = None, sensitive_layer: str | None = None, draw_device: str | None = None
          ) -> Path:
    """Write a complete diffusers-format folder for (family, size, seed) at `out_dir` and return its path.

    The folder is written into a temp dir next to `out_dir` and renamed into place, so `out_dir` either does not
    exist or is complete; a failure removes the temp dir. An existing non-empty `out_dir` raises FileExistsError
    unless overwrite=True. `dtype` overrides the family's storage dtype for that size. `draw_device` (a GPU) draws
    the weights there: seconds instead of minutes for a full-size model, but other values than the CPU's (the
    GPU's name goes into the folder's marker, so the model hash tells the two apart)."""
    fam = _sized(family, size)
    drawn = drawn_on(draw_device)  # refuses a device that cannot draw before anything is written
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if _nonempty(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published folder should read like any other
        with synth.drawing_on(draw_device or "cpu"):
            fam.write(tmp, size, seed, dtype, **({"sensitive_layer": sensitive_layer} if sensitive_layer else {}))
        meta = _provenance(family, size, seed, dtype or getattr(fam, "STORAGE_DTYPE", {}).get(size), sensitive_layer,
                           drawn)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not _nonempty(out_dir):
        os.replace(tmp, out_dir)  # rename(2) also replaces an empty directory
        return
    if not overwrite:  # appeared while we were building
        raise FileExistsError(f"{out_dir} appeared during the build and is not empty")
    # Swap with two renames so no moment shows a half-written folder; the old one is deleted afterwards.
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, trash)
    os.replace(tmp, out_dir)
    shutil.rmtree(trash)


def cache_key(family: str, size: str, seed: int, sensitive_layer: str | None = None, draw_device: str | None = None
              ) -> str:
    """The cached folder's name: family, size, seed (the planted sensitive layer, the GPU model it was drawn on) and
    a short hash of ZOO_VERSION."""
    _sized(family, size)
    version = hashlib.sha256(ZOO_VERSION.encode()).hexdigest()[:8]
    planted = f"-sensitive-{sensitive_layer}" if sensitive_layer else ""
    drawn = drawn_on(draw_device)
    gpu = "-drawn-" + hashlib.sha256(drawn.encode()).hexdigest()[:8] if drawn else ""
    return f"{family}-{size}-seed{seed}{planted}{gpu}-{version}"


def cached_build(family: str, size: str = "tiny", seed: int = 0, root=".zoo", sensitive_layer: str | None = None,
                 draw_device: str | None = None) -> Path:
    """Build (family, size, seed) into root/<cache_key> once and reuse it. Safe against concurrent callers: the
    loser of a race discards its copy and returns the winner's."""
    path = Path(root).absolute() / cache_key(family, size, seed, sensitive_layer, draw_device)
    if (path / MARKER).is_file():
        return path
    try:
        return build(family, path, size, seed, sensitive_layer=sensitive_layer, draw_device=draw_device)
    except (FileExistsError, OSError):
        if (path / MARKER).is_file():  # another process published the same build first
            return path
        raise
