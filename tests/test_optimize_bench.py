"""`parity bench` modes: every OptimizeSpec switch is a mode option by its field name, the short names keep their
meaning, and a bad mode fails before anything is built, naming the valid choices."""
import dataclasses

import pytest

from engine.api import OptimizeSpec
from harness.bench_modes import ENGINE_ALIASES, engine_options, parse_mode


def test_every_boolean_switch_is_an_option():
    flags = {f.name for f in dataclasses.fields(OptimizeSpec) if isinstance(f.default, bool)}
    assert flags <= set(engine_options())
    assert {"cuda_graphs", "fp8_fast_accum", "fp8_wo_output_scale", "compile_blocks"} <= flags


@pytest.mark.parametrize("mode, quant, spec", [
    ("engine-bf16", "none", OptimizeSpec()),
    ("engine-bf16+compile", "none", OptimizeSpec(compile_blocks=True)),
    ("engine-bf16+compile+cuda_graphs", "none", OptimizeSpec(compile_blocks=True, cuda_graphs=True)),
    ("engine-fp8+compile+fp8_fast_accum", "fp8", OptimizeSpec(compile_blocks=True, fp8_fast_accum=True)),
    ("engine-fp8-wo+compile+autotune+fp8_wo_output_scale", "fp8-wo",
     OptimizeSpec(compile_blocks=True, compile_mode="max-autotune-no-cudagraphs", fp8_wo_output_scale=True)),
    ("engine-nvfp4+cudnn", "nvfp4", OptimizeSpec(attention="sdpa-cudnn")),
])
def test_engine_modes(mode, quant, spec):
    parsed = parse_mode(mode)
    assert (parsed.backend, parsed.quant, parsed.optimize) == ("engine", quant, spec)


@pytest.mark.parametrize("mode, compile_", [("diffusers-bf16", None), ("diffusers-bf16+compile", "whole"),
                                            ("diffusers-bf16+regional", "regional")])
def test_diffusers_modes(mode, compile_):
    parsed = parse_mode(mode)
    assert (parsed.backend, parsed.compile, parsed.optimize) == ("diffusers", compile_, None)


@pytest.mark.parametrize("mode, message", [
    ("engine-bf16+graphs", r"unknown bench option\(s\) \['graphs'\].*\+cuda_graphs"),
    ("diffusers-bf16+cuda_graphs",
     r"valid: diffusers\[-pipeline\]-bf16\[\+torchao-<fp8-rowwise\|fp8-wo>\[-blocks\]\]\[\+compile\|\+regional\]"),
    ("diffusers-fp8", "unknown diffusers bench mode"),
    ("torch-bf16", "unknown bench mode"),
    ("engine", "unknown bench mode"),
])
def test_bad_modes_name_the_valid_ones(mode, message):
    with pytest.raises(ValueError, match=message):
        parse_mode(mode)


def test_aliases_name_real_fields():
    names = {f.name for f in dataclasses.fields(OptimizeSpec)}
    for alias, switches in ENGINE_ALIASES.items():
        assert set(switches) <= names, alias
        OptimizeSpec(**switches)
