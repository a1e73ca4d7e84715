"""What a model family gives the engine: one frozen record per family, registered in engine/families.py.

Generic code (the runner, quantization tools, the weight report, parallelism, bench) reaches a family only through
this record, so a new family is its own files plus one registry line. Pipelines with several denoisers are the
general case: every denoiser named in `denoisers` is loaded, quantized, optimized and parallelized alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

KeyMap = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Family:
    name: str
    # model_index.json `_class_name` of the diffusers folders this family loads (how a bare folder is recognised).
    diffusers_pipeline: str
    # The frozen dataclass of the family's sampling parameters (RunConfig.sampling holds one). Its fields are suite
    # keys, report columns and part of the golden key; it has a `true_cfg` property (two guidance branches per step:
    # what cfg2 parallelism splits, and the cell name's "+truecfg").
    sampling: type
    # Component folders that hold a denoiser, in the order the pipeline uses them; attributes of the same names on
    # the pipeline object hold the built models.
    denoisers: tuple[str, ...]
    # pipeline(cfg) -> a Runner whose denoisers are loaded and quantized as cfg says (not yet optimized/parallel).
    # A family may also take pipeline(cfg, components=...): built components by folder name (tokenizers, text
    # encoders, VAE; a denoiser as DenoiserWeights; "scheduler" as its config dict) in place of what it would load
    # from cfg.model_dir, so a bench can run the whole pipeline on weights synthesized on the GPU.
    pipeline: Callable[..., Any]
    # (denoiser name, its diffusers config dict) -> (meta-buildable constructor, checkpoint key map).
    denoiser_builder: Callable[[str, dict], tuple[Callable[[], nn.Module], KeyMap]]
    # (denoiser module, diffusers-named inputs) -> output: one denoiser call, as the reference's model is called.
    denoiser_forward: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
    # (denoiser name, diffusers config, BenchShape, dtype, device) -> diffusers-named inputs: the bench's input hook.
    bench_inputs: Callable[..., dict[str, torch.Tensor]]
    # SequenceParallelTransformer subclass (where text and image sit in the joint sequence); None: no SP support.
    sequence_parallel: type | None = None
    # Components other than the denoisers that a pre-quantized folder may hold in a checkpoint format (a release
    # that ships its text encoder quantized too); `parity quantize` writes them, the pipeline loads them with
    # engine.quant.component.load_component. Empty: such components are always kept as they are.
    quantized_components: tuple[QuantizedComponent, ...] = ()
    # The step-0 denoiser inputs (engine.api.guided_inputs names: diffusers kwargs, the negative branch's under
    # "negative.") that carry the prompt: text features, pooled embeddings. The harness compares them with what
    # diffusers feeds its transformer (conditioning_* metrics), because a tiny denoiser barely responds to its text
    # path and a text-encoder bug would otherwise show only where outputs are bitwise. Inputs the pipeline makes
    # without the prompt (an unconditional branch's zero text, positions, masks) are left out.
    conditioning: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.denoisers:
            raise ValueError(f"family {self.name!r} declares no denoiser")
        if not self.conditioning:
            raise ValueError(f"family {self.name!r} declares no conditioning input (Family.conditioning)")


@dataclass(frozen=True)
class QuantizedComponent:
    """A non-denoiser component (a transformers text encoder) whose linears a pre-quantized folder stores in a
    checkpoint format. The component stays the library's own module: only the linears `select` names are swapped
    for the engine's quantized linear; embeddings, norms, heads and anything `select` leaves out keep the checkpoint's
    tensors."""

    folder: str  # the component folder, also the pipeline attribute that holds it (e.g. "text_encoder")
    model_class: str  # a transformers PreTrainedModel class name: from_pretrained for a plain folder, meta build else
    select: Callable[[str], bool]  # linear module name (the checkpoint's) -> whether the release quantizes it
    formats: tuple[str, ...]  # the checkpoint formats (engine.quant.export.FORMATS) the release stores it in


@dataclass(frozen=True)
class BenchShape:
    """The input size a bench forward runs at; each family's bench_inputs turns it into tensors."""

    height: int = 1024
    width: int = 1024
    text_tokens: int = 512
    batch: int = 1
    seed: int = 0


@dataclass(frozen=True, eq=False)
class DenoiserWeights:
    """A denoiser given in memory instead of its component folder: its diffusers config (constructor arguments) and
    its diffusers-named state dict. The engine loads these into its own model, the reference into diffusers'."""

    config: Mapping[str, Any]
    state_dict: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TokenFamily:
    """A family whose output is tokens, not media (a multimodal language model): the harness compares its logits,
    embedder outputs and greedy continuations with the transformers reference (token-logits metrics) instead of
    latents and images. Registered in engine/families.py TOKEN_FAMILIES.

    `load(folder, dtype, device)` builds the model from a transformers folder; the model serves
    `embedders(inputs) -> {name: tensor}` (each embedder's full output), `logits(inputs) -> (1, S, vocab)` and
    `greedy(inputs, n) -> (n,)` tokens, where `inputs` is the dict of named tensors the family's reference prepares
    (engine-side names). Its block linears are what the quantization walk replaces."""

    name: str
    # config.json `architectures[0]` of the transformers folders this family loads (how a bare folder is recognised).
    transformers_architecture: str
    load: Callable[..., nn.Module]
