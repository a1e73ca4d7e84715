"""The gate, thresholds and run-directory files, on small synthetic results tables (pure pandas, no models)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from harness import report
from harness.gate import gate
from harness.verdict import gate_run_dir
from harness.metrics import METRICS
from harness.report import ResultsError, load_results, read_results_csv, write_run, write_summary
from harness.schema import COLUMNS, ENGINE_VS_REFERENCE, REFERENCE_VS_GOLDEN
from harness.thresholds import DEFAULT_PATH, ThresholdError, Thresholds, load_thresholds, parse_thresholds

CELL = dict(model="flux1", dtype="fp32", quant="none", parallel="sp1", device="cpu", size="tiny", backend="eager",
            optimize="eager")
META = dict(run_id="r1", time="2026-11-23T08:00:00Z", torch_version="2.11", diffusers_version="0.42.1",
            transformers_version="5.17", parity_git="abc123", clip_model="tiny-random", clip_semantic=False,
            weight_bytes=1000, quantized_fraction=0.0)


def row(metric: str, value: float, **kw) -> dict:
    """One results row with every schema column; keyword arguments override any of them."""
    base = {**CELL, "prompt_idx": 0, "prompt": "a red cube", "seed": 0, "steps": 4, "height": 64, "width": 64,
            "guidance": 3.5, "true_cfg_scale": 1.0, "comparison": ENGINE_VS_REFERENCE, "metric": metric,
            "step": pd.NA, "value": value, "status": "ok", "reason": None, "model_hash": "h0", **META}
    base.pop("time")
    base.update(kw)
    base.setdefault("cell", "/".join(str(base[k]) for k in ("model", "dtype", "quant", "parallel")))
    return base


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))[list(COLUMNS)].astype({"step": "Int64"})


def rule(metric: str, op: str, value: float, **kw) -> dict:
    return {"model": "flux1", "dtype": "fp32", "quant": "none", "parallel": "sp1",
            "comparison": ENGINE_VS_REFERENCE, "metric": metric, "op": op, "value": value,
            "source": "test fixture", **kw}


def thresholds(*rules: dict) -> Thresholds:
    return parse_thresholds({"threshold": list(rules)})


def write_toml(path, *rules: dict):
    # json.dumps quotes strings and writes numbers the way TOML reads them.
    path.write_text("".join("[[threshold]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in r.items()) + "\n"
                            for r in rules))
    return path


RULES = (rule("final_latent_cosine", ">=", 0.999), rule("psnr_db", ">=", 20.0))


def good_rows() -> list[dict]:
    # Two prompts, plus a per-step non-gated metric that is terrible: the gate must ignore it.
    return [row("final_latent_cosine", 0.9995), row("psnr_db", 31.0), row("psnr_db", 20.0, prompt_idx=1),
            row("trajectory_cosine", 0.1, step=3)]


def run_gate(tmp_path, rows, rules=RULES):
    run = tmp_path / "run"
    write_run(run, frame(*rows), META)
    code = gate_run_dir(run, write_toml(tmp_path / "t.toml", *rules))
    return code, (run / "summary.md").read_text()


def test_pass_exits_0_and_ignores_non_gated(tmp_path, capsys):
    code, summary = run_gate(tmp_path, good_rows())
    assert code == 0
    assert "GATE PASS" in capsys.readouterr().out
    assert "**PASS**" in summary and "trajectory_cosine" not in summary.split("## Gate")[0]


def test_value_below_threshold_fails_and_is_listed(tmp_path, capsys):
    code, summary = run_gate(tmp_path, good_rows() + [row("psnr_db", 12.345, seed=7)])
    assert code == 1
    failing = summary.split("Failing rows (1)")[1]
    assert "12.345" in failing and "| >= | 20 |" in failing and "| 7 |" in failing
    assert "value 12.345 is not >= 20" in capsys.readouterr().out


def test_nan_value_in_ok_row_fails(tmp_path):
    code, summary = run_gate(tmp_path, good_rows() + [row("final_latent_cosine", math.nan, seed=1)])
    assert code == 1 and "value is NaN" in summary


@pytest.mark.parametrize("status", ["invalid", "error"])
def test_non_ok_rows_fail_with_their_reason(tmp_path, status):
    bad = row("psnr_db", math.nan, seed=2, status=status, reason="decoder produced 12 NaN pixels")
    code, summary = run_gate(tmp_path, good_rows() + [bad])
    assert code == 1
    assert f"status {status}: decoder produced 12 NaN pixels" in summary
    assert "## Errors" in summary and "decoder produced 12 NaN pixels" in summary.split("## Errors")[1]


def test_non_ok_row_of_a_non_gated_metric_still_fails():
    bad = row("clip_score_ref", math.nan, status="invalid", reason="no CLIP")
    res = gate(frame(*good_rows(), bad), thresholds(*RULES))
    assert res.exit_code == 1 and list(res.failed["why"]) == ["status invalid: no CLIP"]


def test_gated_metric_without_threshold_is_an_error(tmp_path, capsys):
    code, summary = run_gate(tmp_path, good_rows() + [row("ssim", 0.99)])
    assert code == 2
    assert "no threshold for 1 gated key(s)" in summary
    assert "flux1/fp32/none/sp1 engine_vs_reference ssim" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    (rule("psnr_db", ">", 20.0), "op must be one of"),
    (rule("psnr", ">=", 20.0), "unknown metric 'psnr' (did you mean 'psnr_db'?); valid: "),
    ({k: v for k, v in rule("psnr_db", ">=", 20.0).items() if k != "source"}, "missing field(s) ['source']"),
    (rule("psnr_db", ">=", 20.0, source=""), "source must be a non-empty string"),
    (rule("psnr_db", ">=", 20.0, sorce="typo"), "unknown field(s) ['sorce']"),
    (rule("psnr_db", ">=", math.inf), "value must be a finite number"),
    (rule("psnr_db", ">=", "20"), "value must be a finite number"),
    (rule("psnr_db", ">=", 20.0, comparison="engine_vs_golden"), "unknown comparison 'engine_vs_golden'"),
    (rule("trajectory_cosine", ">=", 0.9), "is not gated"),
    (rule("psnr_db", "<=", 20.0), "higher is better: use '>='"),
    (rule("mean_abs_diff", ">=", 8.0), "lower is better: use '<='"),
    (rule("clip_score_delta", ">=", 1.0), "absolute (|value| is gated): use '<='"),
])
def test_malformed_thresholds_are_rejected_clearly(bad, message):
    with pytest.raises(ThresholdError) as e:
        thresholds(rule("ssim", ">=", 0.9), bad)
    assert message in str(e.value) and "threshold #2" in str(e.value)


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ThresholdError, match="single_step_cosine"):
        thresholds(rule("nonsense", ">=", 1.0))


def test_duplicate_threshold_is_rejected():
    with pytest.raises(ThresholdError, match=r"threshold #2 .*duplicate of threshold #1"):
        thresholds(rule("ssim", ">=", 0.9), rule("ssim", ">=", 0.8))


def test_malformed_thresholds_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "t.toml"
    bad.write_text("[[threshold]]\nmetric = \n")
    write_run(tmp_path / "run", frame(*good_rows()), META)
    assert gate_run_dir(tmp_path / "run", bad) == 2
    assert "cannot read thresholds" in capsys.readouterr().out
    assert gate_run_dir(tmp_path / "run", tmp_path / "absent.toml") == 2


def test_most_specific_threshold_wins():
    t = thresholds(rule("psnr_db", ">=", 10.0, dtype="*"), rule("psnr_db", ">=", 30.0),
                   rule("psnr_db", ">=", 5.0, model="*", dtype="*", quant="*", parallel="*"))
    key = ("flux1", "{}", "none", "sp1", ENGINE_VS_REFERENCE, "psnr_db")
    assert t.lookup(tuple(k.format("fp32") for k in key)).value == 30.0
    assert t.lookup(tuple(k.format("bf16") for k in key)).value == 10.0
    assert t.lookup(("sd3", "bf16", "fp8", "ulysses2", ENGINE_VS_REFERENCE, "psnr_db")).value == 5.0
    assert t.lookup(("flux1", "fp32", "none", "sp1", REFERENCE_VS_GOLDEN, "psnr_db")) is None


def test_equally_specific_thresholds_are_ambiguous():
    t = thresholds(rule("psnr_db", ">=", 10.0, quant="*"), rule("psnr_db", ">=", 30.0, dtype="*"))
    with pytest.raises(ThresholdError, match=r"threshold #1 .* and threshold #2 .*match equally"):
        t.lookup(("flux1", "fp32", "none", "sp1", ENGINE_VS_REFERENCE, "psnr_db"))
    res = gate(frame(row("psnr_db", 25.0)), t)
    assert res.exit_code == 2 and "match equally specifically" in res.errors[0]


def test_absolute_metric_gates_magnitude():
    t = thresholds(rule("clip_score_delta", "<=", 2.0))
    res = gate(frame(row("clip_score_delta", -1.5), row("clip_score_delta", -3.0, seed=1),
                     row("clip_score_delta", 2.5, seed=2)), t)
    assert res.exit_code == 1
    assert list(res.rows["passed"]) == [True, False, False]
    assert res.failed["why"].iloc[0] == "|value| 3 is not <= 2"


def test_lower_is_better_metric_uses_le():
    res = gate(frame(row("mean_abs_diff", 3.0), row("mean_abs_diff", 9.0, seed=1)),
               thresholds(rule("mean_abs_diff", "<=", 8.0)))
    assert list(res.rows["passed"]) == [True, False]


def test_golden_thresholds_load_and_cover_every_gated_metric():
    t = load_thresholds()
    assert t.path == DEFAULT_PATH and all(r.source for r in t.rules)
    # weight_*: quant cells only; the cross-check is gated in its own comparison (self_check); layer_*: the quant
    # oracle's own comparisons (quant_oracle, quant_layers), quant cells only; video metrics: video cells only
    gated = [m for m, s in METRICS.items() if s.gated and not m.startswith(("weight_", "layer_"))
             and m != "metric_crosscheck_error" and not s.video and s.output == "media"]  # token metrics: token suites only
    for dtype in ("fp32", "bf16"):
        assert t.lookup(("flux1", dtype, "none", "sp1", "self_check", "metric_crosscheck_error")) is not None
        for m in gated:
            assert t.lookup(("flux1", dtype, "none", "sp1", ENGINE_VS_REFERENCE, m)) is not None, (dtype, m)
        for m in ("final_latent_cosine", "psnr_db"):
            assert t.lookup(("flux1", dtype, "none", "sp1", REFERENCE_VS_GOLDEN, m)) is not None
    for quant in ("fp8", "fp8-wo", "nvfp4", "nvfp4-wo", "mxfp4"):
        assert t.lookup(("flux1", "bf16", quant, "sp1", "quant_oracle", "layer_output_rel_error")) is not None
        assert t.lookup(("flux1", "bf16", quant, "sp1", "quant_layers", "layer_set_mismatch")).value == 0


def test_missing_or_corrupt_results_exit_2(tmp_path, capsys):
    assert gate_run_dir(tmp_path / "nowhere") == 2
    assert "results file not found" in capsys.readouterr().out
    (tmp_path / "results.parquet").write_bytes(b"not parquet")
    assert gate_run_dir(tmp_path) == 2
    assert "cannot read results" in (tmp_path / "summary.md").read_text()


def test_empty_results_exit_2():
    assert gate(frame(row("psnr_db", 30.0)).iloc[:0], thresholds(*RULES)).exit_code == 2


def test_load_results_names_missing_columns(tmp_path):
    frame(*good_rows()).drop(columns=["seed", "reason"]).to_parquet(tmp_path / "results.parquet")
    with pytest.raises(ResultsError, match=r"\['seed', 'reason'\]"):
        load_results(tmp_path)


def test_parquet_and_csv_round_trip_identical(tmp_path):
    tricky = frame(row("psnr_db", 0.1 + 0.2, prompt='None, "quoted"\nnewline'),
                   row("trajectory_cosine", 1 - 1e-12, step=0, prompt="NA"),
                   row("ssim", math.nan, status="invalid", reason="constant image", prompt=""),
                   row("psnr_db", math.inf, clip_semantic=True))
    tricky["extra_after_schema"] = ["a", "b", "c", "d"]
    write_run(tmp_path, tricky, META)
    from_parquet, from_csv = load_results(tmp_path), read_results_csv(tmp_path / "results.csv")
    pd.testing.assert_frame_equal(from_parquet, from_csv)
    assert list(from_parquet.columns) == list(COLUMNS) + ["extra_after_schema"]
    assert from_parquet.loc[0, "value"] == 0.1 + 0.2 and from_parquet.loc[1, "prompt"] == "NA"
    assert from_parquet["step"].isna().sum() == 3
    assert json.loads((tmp_path / "meta.json").read_text())["run_id"] == "r1"
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files behind


def test_failed_atomic_write_leaves_old_file(tmp_path):
    target = tmp_path / "summary.md"
    target.write_text("old")

    def explode(path):
        open(path, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        report._atomic_write(target, explode)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_summary_header_worst_values_and_gate_rewrite(tmp_path):
    rows = [row("psnr_db", 30.0), row("psnr_db", 25.0, prompt_idx=1), row("mean_abs_diff", 1.0),
            row("mean_abs_diff", 4.0, seed=1), row("clip_score_delta", 0.5), row("clip_score_delta", -1.5, seed=1)]
    write_summary(tmp_path, frame(*rows), meta={**META, "suite": "smoke"})
    text = (tmp_path / "summary.md").read_text()
    assert "# parity run r1" in text and "abc123" in text and "- suite: smoke" in text
    assert "**Warning: non-semantic CLIP" in text
    assert "Not gated yet" in text and "- flux1/fp32/none/sp1\n" in text
    write_run(tmp_path, frame(*rows), META)
    t = write_toml(tmp_path / "t.toml", rule("psnr_db", ">=", 28.0), rule("mean_abs_diff", "<=", 8.0),
                   rule("clip_score_delta", "<=", 1.0))
    assert gate_run_dir(tmp_path, t) == 1
    assert gate_run_dir(tmp_path, t) == 1  # a second run replaces the gate section, it does not add one
    text = (tmp_path / "summary.md").read_text()
    assert text.count("## Gate") == 1 and "Failing rows (2)" in text and "- suite: smoke" in text
    # One line per cell: the metric using most of its error budget (psnr 25 dB vs >= 28: 200%), its margin.
    assert ("- **FAIL** `flux1/fp32/none/sp1` (2 failing row(s); first: |value| 1.5 is not <= 1): "
            "engine_vs_reference psnr_db 25 (>= 28): margin -3, 200% of its error budget [seed 0, prompt_idx 1]"
            in text), text
    assert "| 25 | 4 | 1.5 |" not in text  # the wide table lives in the parquet and the HTML, not here


def test_thresholds_keyed_by_the_engine_switches():
    """A compiled cell has floors of its own (optimize label): its rows use them, eager rows keep the general ones,
    and the same key twice for one optimize label is a duplicate while two labels are not."""
    t = thresholds(rule("single_step_cosine", ">=", 0.999),
                   rule("single_step_cosine", ">=", 0.9999, optimize="compile_blocks"))
    key = ("flux1", "fp32", "none", "sp1", ENGINE_VS_REFERENCE, "single_step_cosine")
    assert t.lookup(key, "compile_blocks").value == 0.9999
    assert t.lookup(key, "eager").value == 0.999 and t.lookup(key, None).value == 0.999
    # 0.9995: inside the eager floor, a regression for the compiled cell (measured 0.99998).
    res = gate(frame(row("single_step_cosine", 0.9995), row("single_step_cosine", 0.9995, optimize="compile_blocks",
                                                            cell="flux1/fp32/none/sp1/compile_blocks")), t)
    assert res.exit_code == 1 and list(res.failed.optimize) == ["compile_blocks"]
    with pytest.raises(ThresholdError, match="duplicate"):
        thresholds(rule("ssim", ">=", 0.9, optimize="compile_blocks"), rule("ssim", ">=", 0.8, optimize="compile_blocks"))
    with pytest.raises(ThresholdError, match="optimize must be a non-empty string"):
        thresholds(rule("ssim", ">=", 0.9, optimize=""))
    # Results without the optimize column cannot be told apart: an error, not a silent use of the general floors.
    rows = frame(row("single_step_cosine", 0.99999)).drop(columns=["optimize"])
    res = gate(rows, t)
    assert res.exit_code == 2 and any("lack the optimize column" in e for e in res.errors)


def test_the_compiled_cells_own_floors_in_the_shipped_thresholds():
    t = load_thresholds()
    key = ("flux1", "bf16", "none", "sp1", ENGINE_VS_REFERENCE, "single_step_cosine")
    compiled, eager = t.lookup(key, "compile_blocks"), t.lookup(key, "eager")
    assert compiled.optimize == "compile_blocks" and compiled.value > eager.value
