"""Device-keyed floors (issue 15): a [[group]] or [[threshold]] may name the device kind it was measured on, so that
floors measured on GPUs judge GPU rows while CPU rows keep theirs (pure pandas, no models)."""
from __future__ import annotations

import pytest

from harness import selfcheck
from harness.gate import gate
from harness.schema import ENGINE_VS_REFERENCE, NEGATIVE_CONTROL, PARALLEL_VS_SINGLE
from harness.thresholds import ThresholdError, parse_thresholds
from tests.test_gate import frame, row

KEY = dict(model="flux1", dtype="fp32", quant="none", parallel="ulysses4", comparison=PARALLEL_VS_SINGLE)
LOOKUP = ("flux1", "fp32", "none", "ulysses4", PARALLEL_VS_SINGLE, "final_latent_cosine")


def groups(*extra: dict) -> dict:
    """An any-device group for every parallel config, plus `extra` groups on top of it."""
    base = {**KEY, "parallel": "*", "source": "test: any device", "at_least": {"final_latent_cosine": 0.999}}
    return {"group": [base, *extra]}


def cuda_group(value: float, **kw) -> dict:
    return {**KEY, "parallel": "*", "device": "cuda", "source": "test: measured on cuda",
            "at_least": {"final_latent_cosine": value}, **kw}


def test_a_cuda_group_judges_cuda_rows_and_not_cpu_rows():
    t = parse_thresholds(groups(cuda_group(0.99999)))
    assert t.lookup(LOOKUP, "eager", "cuda").value == 0.99999
    assert t.lookup(LOOKUP, "eager", "cuda:3").value == 0.99999  # a kind: every card
    assert t.lookup(LOOKUP, "eager", "cpu").value == 0.999
    assert t.lookup(LOOKUP, "eager", None).value == 0.999  # results without a device: any-device rules only
    assert t.lookup(LOOKUP, "eager", "cuda").label().endswith("device=cuda)")


def test_the_device_group_is_what_judges_a_row():
    """Planted: the same value on both devices. Tight cuda floor -> the cuda row fails where the any-device floor
    passes it; loose cuda floor -> a cuda row passes that the any-device floor would fail, and the cpu row with the
    same value still fails."""
    cells = dict(model="flux1", dtype="fp32", quant="none", parallel="ulysses4", comparison=PARALLEL_VS_SINGLE)

    def rows(value):
        return frame(row("final_latent_cosine", value, device="cpu", cell="flux1/ulysses4/cpu", **cells),
                     row("final_latent_cosine", value, device="cuda:0", cell="flux1/ulysses4/cuda", **cells))

    tight = gate(rows(0.9995), parse_thresholds(groups(cuda_group(0.9999))))
    assert tight.exit_code == 1 and list(tight.failed.device) == ["cuda:0"]
    assert list(tight.rows.threshold) == [0.999, 0.9999]
    loose = gate(rows(0.995), parse_thresholds(groups(cuda_group(0.99))))
    assert loose.exit_code == 1 and list(loose.failed.device) == ["cpu"]
    assert gate(rows(0.9995), parse_thresholds(groups(cuda_group(0.99)))).exit_code == 0


def test_device_counts_in_specificity():
    """A cuda rule for any parallel config and a cpu-or-cuda rule for ulysses4 are equally specific: a tie is an
    error, never a silent pick; naming the parallel config on the cuda rule makes it win."""
    specific = {**KEY, "source": "test: ulysses4", "at_least": {"final_latent_cosine": 0.9995}}
    t = parse_thresholds(groups(cuda_group(0.99999), specific))
    assert t.lookup(LOOKUP, "eager", "cpu").value == 0.9995
    with pytest.raises(ThresholdError, match="equally specifically"):
        t.lookup(LOOKUP, "eager", "cuda")
    t = parse_thresholds(groups(cuda_group(0.99999, parallel="ulysses4"), specific))
    assert t.lookup(LOOKUP, "eager", "cuda").value == 0.99999


@pytest.mark.parametrize("bad", ["gpu", "cuda:0", "CUDA", "", 0])
def test_a_bad_device_is_refused_naming_the_valid_kinds(bad):
    with pytest.raises(ThresholdError, match="device") as e:
        parse_thresholds(groups(cuda_group(0.9999, device=bad)))
    if isinstance(bad, str) and bad:
        assert "'cpu', 'cuda'" in str(e.value) and repr(bad) in str(e.value)


def test_duplicates_are_per_device():
    parse_thresholds(groups(cuda_group(0.9999), cuda_group(0.9998, device="cpu")))
    with pytest.raises(ThresholdError, match="duplicate"):
        parse_thresholds(groups(cuda_group(0.9999), cuda_group(0.9998)))


def test_results_without_a_device_column_are_an_error_when_floors_key_on_it():
    rows = frame(row("final_latent_cosine", 0.99999, **KEY)).drop(columns=["device"])
    res = gate(rows, parse_thresholds(groups(cuda_group(0.9999))))
    assert res.exit_code == 2 and any("lack the device column" in e for e in res.errors)
    assert gate(rows, parse_thresholds(groups())).exit_code == 0  # no device-keyed rule: nothing to tell apart


def test_a_cuda_row_missing_its_floor_names_the_device():
    """Floors only for cpu: a cuda row has none, and the error says which device asked."""
    only_cpu = {**cuda_group(0.9999), "device": "cpu"}
    res = gate(frame(row("final_latent_cosine", 0.99999, device="cuda", **KEY)),
               parse_thresholds({"group": [only_cpu]}))
    assert res.exit_code == 2 and any("device=cuda" in e for e in res.errors)


def test_negative_controls_are_judged_by_their_devices_engine_floor():
    """A control row must fail the engine floor of its own device: a loose cpu floor lets it pass (the control
    fails as a control), the tight cuda floor rejects it."""
    engine = dict(model="flux1", dtype="fp32", quant="none", parallel="sp1", comparison=ENGINE_VS_REFERENCE)
    t = parse_thresholds({"group": [
        {**engine, "device": "cpu", "source": "test", "at_least": {"single_step_sqnr_db": 10.0}},
        {**engine, "device": "cuda", "source": "test", "at_least": {"single_step_sqnr_db": 40.0}}]})
    control = dict(engine, comparison=NEGATIVE_CONTROL)
    controls = frame(row("single_step_sqnr_db", 30.0, device="cpu", **control),
                     row("single_step_sqnr_db", 30.0, device="cuda", **control))
    judged, errors = selfcheck.judge_controls(controls, t)
    assert not errors and list(judged.threshold) == [10.0, 40.0] and list(judged.passed) == [False, True]
