"""What a CUDA graph captures never reads a value back to the host (generic over every family in the registry).

optimize(cuda_graphs) wraps each denoiser's GRAPH_ENTRY method (default: forward). A host read inside it (`bool(t)`,
`t.item()`, ...) is a device synchronisation, and inside a capture it is an error: Ideogram 4's forward read its
batch's layout that way and every one of its graph cells failed on an H200. No GPU here, so the test watches the
Python-level reads instead: it runs each family's tiny denoiser on its bench inputs twice, as GraphedForward does (a
warm-up call, which may fill host-side caches such as Z-Image's layout, then the call a capture would record), the
second time with every host read refused while the graph entry runs."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine.api import bench_shape
from engine.families import FAMILIES
from engine.models import ideogram4 as I
from harness.zoo import transformer_config

HOST_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}
# A tensor made without a device is made on the CPU; used with a CUDA model's tensors it is copied to the GPU, and a
# capture refuses that copy ("Cannot copy between CPU and CUDA tensors during CUDA graph capture": Ideogram 4's MRoPE
# axis index, on the H200 run after the host reads were gone). On CPU nothing is copied, so the call is what is seen.
FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor,
             torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint}


class NoHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise AssertionError(f"host read {func.__name__} inside the graph entry")
        if func is torch.Tensor.__setitem__ and isinstance(args[-1], (bool, int, float, complex)):
            raise AssertionError("an indexed write of a Python number inside the graph entry (the number is copied to "
                                 "the device: refused inside a capture, measured on an H100)")
        if func in FACTORIES and kwargs.get("device") is None:
            raise AssertionError(f"{func.__name__} without a device inside the graph entry (a host-to-device copy "
                                 "on CUDA)")
        return func(*args, **kwargs)


def guarded(fn, calls: list):
    def run(*args, **kwargs):
        calls.append(None)
        if len(calls) == 1:  # the warm-up
            return fn(*args, **kwargs)
        with NoHostReads():
            return fn(*args, **kwargs)
    return run


def run_entry(family: str, denoiser: str) -> torch.Tensor:
    fam = FAMILIES[family]
    config = transformer_config(family, "tiny", denoiser)
    build, _ = fam.denoiser_builder(denoiser, config)
    torch.manual_seed(0)
    model = build().eval()
    entry = getattr(model, "GRAPH_ENTRY", "forward")
    calls: list = []
    setattr(model, entry, guarded(getattr(model, entry), calls))
    inputs = fam.bench_inputs(denoiser, config, bench_shape(height=64, width=64, text_tokens=8), torch.float32, "cpu")
    with torch.no_grad():
        warm = fam.denoiser_forward(model, inputs)
        out = fam.denoiser_forward(model, inputs)
    assert len(calls) == 2  # the entry is what the family's forward runs
    torch.testing.assert_close(out, warm, rtol=0, atol=0)
    return out


CASES = [(name, d) for name, fam in FAMILIES.items() for d in fam.denoisers]


@pytest.mark.parametrize("family,denoiser", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_the_graph_entry_reads_nothing_back_to_the_host(family, denoiser):
    assert torch.isfinite(run_entry(family, denoiser)).all()


def test_a_host_read_inside_the_graph_entry_fails(monkeypatch):
    """The plant: Ideogram 4's text choice read from the indicator inside the entry again, as before the fix."""
    embed = I.Ideogram4Transformer.embed
    monkeypatch.setattr(I.Ideogram4Transformer, "embed",
                        lambda self, h, e, ind, text=None: embed(self, h, e, ind, None))
    with pytest.raises(AssertionError, match="host read __bool__"):
        run_entry("ideogram4", "transformer")


def test_a_tensor_made_on_the_host_inside_the_graph_entry_fails(monkeypatch):
    """The plant: the MRoPE angles' arange made without the positions' device."""
    arange = torch.arange
    monkeypatch.setattr(I.torch, "arange", lambda *a, **k: arange(*a, **{**k, "device": None}))
    with pytest.raises(AssertionError, match="arange without a device"):
        run_entry("ideogram4", "transformer")


def test_an_indexed_write_of_a_number_inside_the_graph_entry_fails(monkeypatch):
    """The plant: the MRoPE axis table written index by index with Python numbers, as before the fix."""
    def angles(position_ids, head_dim, theta, section):
        out = mrope_angles(position_ids, head_dim, theta, section)
        axis = torch.zeros(head_dim // 2, dtype=torch.long, device=position_ids.device)
        axis[torch.arange(1, 3 * section[1], 3, device=position_ids.device)] = 1
        return out
    mrope_angles = I.mrope_angles
    monkeypatch.setattr(I, "mrope_angles", angles)
    with pytest.raises(AssertionError, match="indexed write of a Python number"):
        run_entry("ideogram4", "transformer")
