"""Pipelines with several denoisers are the general case: a family that declares two (as Wan 2.2's experts or
Ideogram 4's conditional and unconditional transformers will) gets both checked by preflight, both quantized by
`parity quantize`, both in the weight report and both wrapped for sequence parallelism, with no generic code
changed. The two-denoiser family here is FLUX.1's hooks registered under a second name, over a folder whose
transformer is copied to transformer_2 and perturbed so the two are told apart."""
from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.families as families
from engine.api import RunConfig, folder_denoisers, preflight, weight_report
from harness import quantize as tool


@pytest.fixture
def two_denoisers(tiny_flux_dir, tmp_path, monkeypatch):
    fam = dataclasses.replace(families.family("flux1"), name="two-experts", diffusers_pipeline="TwoExpertsPipeline",
                              denoisers=("transformer", "transformer_2"))
    monkeypatch.setitem(families.FAMILIES, "two-experts", fam)
    folder = tmp_path / "two"
    shutil.copytree(tiny_flux_dir, folder)
    shutil.copytree(folder / "transformer", folder / "transformer_2")
    for path in (folder / "transformer_2").glob("*.safetensors"):
        tensors = load_file(path)
        save_file({k: v * 0.5 for k, v in tensors.items()}, path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "TwoExpertsPipeline"}))
    return folder


def test_every_denoiser_is_checked_quantized_and_reported(two_denoisers, tmp_path):
    assert folder_denoisers(two_denoisers) == ("transformer", "transformer_2")
    cfg = RunConfig(family="two-experts", model_dir=str(two_denoisers), prompts=("p",), dtype="bf16", quant="fp8")
    preflight(cfg)
    rows = [(d, layer) for d, layer, _, _ in weight_report(cfg, two_denoisers)]
    assert {d for d, _ in rows} == {"transformer", "transformer_2"}
    assert [layer for d, layer in rows if d == "transformer"] == [layer for d, layer in rows if d == "transformer_2"]

    out = tool.quantize_folder(two_denoisers, "fp8-wo", tmp_path / "q")
    for name in ("transformer", "transformer_2"):
        assert (out / name / tool.CONFIG_NAME).is_file()
    w1 = load_file(out / "transformer" / tool.WEIGHTS_NAME)
    w2 = load_file(out / "transformer_2" / tool.WEIGHTS_NAME)
    key = next(k for k in w1 if k.endswith(".weight_scale"))
    torch.testing.assert_close(w2[key], w1[key] * 0.5)  # each denoiser quantized from its own weights


def test_a_bad_pattern_names_the_denoiser(two_denoisers):
    cfg = RunConfig(family="two-experts", model_dir=str(two_denoisers), prompts=("p",), quant="fp8",
                    quant_ignored=("no_such_layer",))
    with pytest.raises(ValueError, match="denoiser 'transformer': --quant-ignored-layers pattern 'no_such_layer'"):
        preflight(cfg)


def test_parallelism_wraps_every_denoiser(monkeypatch):
    import engine.parallel.api as parallel_api

    monkeypatch.setattr(parallel_api, "init_distributed", lambda spec, device: None)
    monkeypatch.setattr(parallel_api, "get_mesh", lambda spec: SimpleNamespace(cfg=None))
    wrap = lambda model, mesh: ("wrapped", model)  # noqa: E731
    fam = SimpleNamespace(name="two-experts", denoisers=("transformer", "transformer_2"), sequence_parallel=wrap)
    pipe = SimpleNamespace(device=torch.device("cpu"), transformer="a", transformer_2="b")
    parallel_api.apply_parallel(pipe, "ulysses2", fam)
    assert (pipe.transformer, pipe.transformer_2) == (("wrapped", "a"), ("wrapped", "b"))
