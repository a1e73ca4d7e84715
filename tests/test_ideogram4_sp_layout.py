"""Ideogram 4's sequence-parallel forward reads nothing back to the host when the pipeline passes the batch's
PackedLayout (read once per generation from its host-side ids): no text length, image-order check or padding
decision per step, each a device synchronisation on a GPU and a refusal inside a CUDA graph capture.

Over 2 gloo ranks, fp32, the tiny zoo's transformers built from a seed (no checkpoint): Ulysses-2 and ring-2, the
conditional transformer on a left-padded batch and the unconditional one (text length 0, no padding). With the
layout the forward equals, bitwise, the one that reads its layout itself and the unwrapped model on one device, and
it runs with every host read refused (tests/test_graph_entry.py's NoHostReads, entered only around that call, with
the wrapper's sampled replication check off: it syncs by design). Plants, which the refusal must catch: the text
length read from the indicator again (the code before this change), and the SP attention's own per-mask check
(a host read per new mask, i.e. per forward) no longer spared for the wrapper's mask, whose image keys are True by
construction."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_graph_entry import NoHostReads

from engine.models import ideogram4 as I

SCHEMES = {"ulysses2": (2, 1), "ring2": (1, 2)}
MAX_TEXT = 12


def _inputs(config: dict, conditional: bool) -> dict[str, torch.Tensor]:
    import engine.pipelines.ideogram4 as ipipe

    g = torch.Generator().manual_seed(1)
    pos, seg, ind = ipipe.packed_ids([7, MAX_TEXT], (4, 5), MAX_TEXT)  # the first prompt's text is left-padded
    x = torch.randn(*seg.shape, config["in_channels"], generator=g) * (ind == I.IMAGE_INDICATOR)[..., None]
    e = torch.randn(*seg.shape, config["llm_features_dim"], generator=g) * (ind == I.TEXT_INDICATOR)[..., None]
    inputs = dict(hidden_states=x, timestep=torch.tensor([0.3, 0.7]), encoder_hidden_states=e, position_ids=pos,
                  segment_ids=seg, indicator=ind)
    return inputs if conditional else ipipe.unconditional_inputs(inputs, MAX_TEXT)


def _refused(fn) -> str:
    """The refusal's message, or '' when the call ran with every host read refused."""
    try:
        with NoHostReads():
            fn()
    except AssertionError as e:
        return str(e)
    return ""


def _worker(rank: int, world: int, store: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import engine.pipelines.ideogram4 as ipipe
    from engine.parallel.attention import JointSequenceParallelAttention
    from engine.parallel.config import ParallelSpec
    from engine.parallel.mesh import build_mesh
    from harness.zoo import transformer_config

    res = {}
    try:
        for scheme, (u, r) in SCHEMES.items():
            mesh = build_mesh(ParallelSpec(ulysses=u, ring=r))
            for name in ("transformer", "unconditional_transformer"):
                config = transformer_config("ideogram4", "tiny", name)
                build, _ = ipipe.denoiser_builder(name, config)
                torch.manual_seed(0)
                model = build().eval()
                inputs = _inputs(config, name == "transformer")
                layout = I.packed_layout(inputs["segment_ids"], inputs["indicator"])
                with torch.no_grad():
                    single = ipipe.denoiser_forward(model, inputs)
                    wrapped = ipipe.Ideogram4Parallel(model, mesh)
                    wrapped.replication_check_every = 0
                    eager = ipipe.denoiser_forward(wrapped, inputs)
                    out: list[torch.Tensor] = []
                    refusal = _refused(lambda: out.append(ipipe.denoiser_forward(wrapped, inputs, layout)))
                    key = (scheme, name)
                    res[("layout",) + key] = (layout.text, layout.padded, layout.text_len)
                    res[("refusal",) + key] = refusal
                    res[("outputs",) + key] = (out[0] if out else None, eager, single,
                                               inputs["indicator"] == I.IMAGE_INDICATOR)
                    if scheme != "ulysses2":
                        continue
                    # Plants: each rank raises at the same point, before any collective of the call.
                    forward = ipipe.Ideogram4Parallel.forward

                    def planted(self, *args, layout=None):
                        int((~(args[5] == I.IMAGE_INDICATOR)).sum(1).max())  # the per-call read, put back
                        return forward(self, *args, layout=layout)
                    ipipe.Ideogram4Parallel.forward = planted
                    try:
                        res[("plant-text-len",) + key] = _refused(
                            lambda: ipipe.denoiser_forward(wrapped, inputs, layout))
                    finally:
                        ipipe.Ideogram4Parallel.forward = forward
                    vouch = JointSequenceParallelAttention.vouch_for
                    JointSequenceParallelAttention.vouch_for = lambda self, mask: None
                    try:
                        res[("plant-mask-check",) + key] = _refused(
                            lambda: ipipe.denoiser_forward(wrapped, inputs, layout))
                    finally:
                        JointSequenceParallelAttention.vouch_for = vouch
    finally:
        dist.destroy_process_group()
    torch.save(res, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(rank_results):
    return rank_results(_worker, 2)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("name", ["transformer", "unconditional_transformer"])
def test_sp_forward_with_a_layout_reads_nothing_and_changes_no_bit(ranks, scheme, name):
    for rank in ranks:
        assert rank[("layout", scheme, name)] == (
            (True, True, MAX_TEXT) if name == "transformer" else (False, False, 0))
        assert rank[("refusal", scheme, name)] == ""
        fast, eager, single, image = rank[("outputs", scheme, name)]
        assert torch.equal(fast, eager)
        if scheme == "ring2":  # partials merged by log-sum-exp: not the one-device bits
            torch.testing.assert_close(fast[image], single[image], rtol=0, atol=1e-5)
        else:
            assert torch.equal(fast, single)


def test_a_host_read_in_the_sp_forward_is_refused(ranks):
    for rank in ranks:
        for name in ("transformer", "unconditional_transformer"):
            assert "host read __int__" in rank[("plant-text-len", "ulysses2", name)]
        # Only the padded batch has a mask; the unconditional transformer's has none to check.
        assert "host read __bool__" in rank[("plant-mask-check", "ulysses2", "transformer")]
        assert rank[("plant-mask-check", "ulysses2", "unconditional_transformer")] == ""


def test_packed_layout_refuses_an_image_token_before_text():
    seg = torch.ones(1, 4, dtype=torch.long)
    ind = torch.tensor([[I.TEXT_INDICATOR, I.IMAGE_INDICATOR, I.TEXT_INDICATOR, I.IMAGE_INDICATOR]])
    with pytest.raises(ValueError, match="image tokens last, after every text and pad token"):
        I.packed_layout(seg, ind)
    assert I.packed_layout(seg, ind.sort(1, descending=True).values) == I.PackedLayout(True, False, 2)
