"""Size-keyed floors: a [[group]] may name the zoo size it was measured on, so that floors measured on a full-size
model judge full-size rows while the tiny zoo's rows keep theirs, and the other way round (pure pandas, no models)."""
from __future__ import annotations

import pytest

from harness.gate import gate
from harness.schema import ENGINE_VS_REFERENCE
from harness.thresholds import ZOO_SIZES, ThresholdError, parse_thresholds
from tests.test_gate import frame, row

KEY = dict(model="ideogram4", dtype="bf16", quant="fp8-wo", parallel="sp1", comparison=ENGINE_VS_REFERENCE)
LOOKUP = ("ideogram4", "bf16", "fp8-wo", "sp1", ENGINE_VS_REFERENCE, "final_latent_cosine")


def thresholds(full: float, **kw) -> dict:
    tiny = {**KEY, "source": "test: the tiny zoo on CPU", "at_least": {"final_latent_cosine": 0.999}}
    full = {**KEY, "device": "cuda", "size": "full", "source": "test: measured at full size",
            "at_least": {"final_latent_cosine": full}, **kw}
    return {"group": [tiny, full]}


def rows(value: float):
    return frame(row("final_latent_cosine", value, device="cuda:0", size="tiny", cell="ideogram4/tiny", **KEY),
                 row("final_latent_cosine", value, device="cuda:0", size="full", cell="ideogram4/full", **KEY))


def test_a_full_size_group_judges_full_size_rows_only():
    t = parse_thresholds(thresholds(0.98))
    assert t.lookup(LOOKUP, "eager", "cuda", "full").value == 0.98
    assert t.lookup(LOOKUP, "eager", "cuda", "tiny").value == 0.999
    assert t.lookup(LOOKUP, "eager", "cuda", None).value == 0.999  # results without the column: any-size rules
    assert t.lookup(LOOKUP, "eager", "cpu", "full").value == 0.999  # measured on cuda: not a CPU floor
    assert t.lookup(LOOKUP, "eager", "cuda", "full").label().endswith("size=full)")


def test_the_size_group_is_what_judges_a_row():
    """Planted: one value in both sizes. The loose full-size floor passes the full row, the tiny floor still fails
    the tiny row; a full-size floor tighter than the value fails the full row where the tiny floor would pass it."""
    loose = gate(rows(0.99), parse_thresholds(thresholds(0.98)))
    assert loose.exit_code == 1 and list(loose.failed["size"]) == ["tiny"]
    tight = gate(rows(0.9995), parse_thresholds(thresholds(0.9999)))
    assert tight.exit_code == 1 and list(tight.failed["size"]) == ["full"]
    assert gate(rows(0.9999), parse_thresholds(thresholds(0.98))).exit_code == 0


@pytest.mark.parametrize("bad", ["ful", "small", "FULL", ""])
def test_a_bad_size_is_refused_naming_the_valid_sizes(bad):
    with pytest.raises(ThresholdError, match="size") as e:
        parse_thresholds(thresholds(0.98, size=bad))
    if bad:
        assert "'tiny', 'full'" in str(e.value)


def test_an_exact_tier_may_name_its_size():
    tier = {**KEY, "device": "cuda", "optimize": "cuda_graphs", "exact": True, "size": "full", "source": "test"}
    t = parse_thresholds({"group": [tier, thresholds(0.98)["group"][0]]})
    cell = LOOKUP[:4]
    assert t.exact_rule(cell, "cuda:0", "cuda_graphs", ENGINE_VS_REFERENCE, "full") is not None
    assert t.exact_rule(cell, "cuda:0", "cuda_graphs", ENGINE_VS_REFERENCE, "tiny") is None
    with pytest.raises(ThresholdError, match="size"):
        parse_thresholds({"group": [{**tier, "size": "huge"}, thresholds(0.98)["group"][0]]})


def test_the_sizes_a_rule_may_name_are_the_zoos():
    from harness.zoo import FAMILIES

    assert set(ZOO_SIZES) == {s for fam in FAMILIES.values() for s in fam.SIZES}
