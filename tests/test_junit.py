"""junit.xml: one testcase per cell with its failing rows as the failure message, validated by junitparser;
gate errors are an <error> testcase; GITHUB_STEP_SUMMARY gets the markdown when it is set."""
from __future__ import annotations

import junitparser
import pytest
from junitparser import Error, Failure, JUnitXml

import report_fixtures as F
from harness.junit import junit_xml
from harness.verdict import gate_run_dir


def cases(path) -> dict:
    xml = JUnitXml.fromfile(str(path))
    return {case.classname: case for suite in xml for case in suite}


def test_passing_run_one_case_per_cell(tmp_path):
    run = F.write_synthetic_run(tmp_path / "run")
    assert gate_run_dir(run, F.thresholds_toml(tmp_path / "t.toml"), baseline=None) == 0
    got = cases(run / "junit.xml")
    assert sorted(got) == ["synthetic.flux1/tiny/bf16/fp8/sp1/cpu", "synthetic.flux1/tiny/bf16/none/sp1/cpu",
                           "synthetic.flux1/tiny/fp32/none/sp1/cpu"]
    assert all(case.is_passed for case in got.values())
    assert "closest: engine_vs_reference single_step_cosine" in got["synthetic.flux1/tiny/bf16/fp8/sp1/cpu"].system_out


def test_failing_rows_are_the_failure_message(tmp_path):
    run = F.write_synthetic_run(tmp_path / "run", F.results(psnr_fp8=20.0))
    ci_path = tmp_path / "ci" / "gate.xml"
    assert gate_run_dir(run, F.thresholds_toml(tmp_path / "t.toml"), baseline=None, junit=ci_path) == 1
    for path in (run / "junit.xml", ci_path):
        got = cases(path)
        fp8 = got["synthetic.flux1/tiny/bf16/fp8/sp1/cpu"]
        (failure,) = fp8.result
        assert isinstance(failure, Failure)
        lines = failure.text.splitlines()
        assert len(lines) == 4  # psnr 20 (seed 0) and 21 (seed 1) dB, both comparisons, all under 30
        assert failure.message.startswith("4 failing row(s): ")
        assert "psnr_db prompt_idx 0 seed 0: value 20 is not >= 30" in failure.text
        assert got["synthetic.flux1/tiny/fp32/none/sp1/cpu"].is_passed
    xml = JUnitXml.fromfile(str(ci_path))
    assert xml.failures == 1 and xml.tests == 3 and xml.errors == 0


def test_gate_error_is_an_error_case(tmp_path):
    run = F.write_synthetic_run(tmp_path / "run")
    (tmp_path / "t.toml").write_text('[[threshold]]\nmodel = "x"\n')
    assert gate_run_dir(run, tmp_path / "t.toml", baseline=None) == 2
    (case,) = cases(run / "junit.xml").values()
    assert isinstance(case.result[0], Error) and "problem" in case.result[0].message


def test_xml_validates_against_the_junit_schema_fields(tmp_path):
    run = F.write_synthetic_run(tmp_path / "run", F.results(psnr_fp8=20.0))
    gate_run_dir(run, F.thresholds_toml(tmp_path / "t.toml"), baseline=None)
    xml = JUnitXml.fromfile(str(run / "junit.xml"))
    for suite in xml:
        assert isinstance(suite, junitparser.TestSuite)
        assert suite.tests == sum(1 for _ in suite) and suite.failures == 1
        for case in suite:
            assert case.name and case.classname


def test_step_summary_appended_when_set(tmp_path, monkeypatch):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    run = F.write_synthetic_run(tmp_path / "run", F.results(psnr_fp8=20.0))
    gate_run_dir(run, F.thresholds_toml(tmp_path / "t.toml"), baseline=None)
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "**FAIL**" in text and "Failing rows (4)" in text


def test_no_step_summary_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    run = F.write_synthetic_run(tmp_path / "run")
    gate_run_dir(run, F.thresholds_toml(tmp_path / "t.toml"), baseline=None)
    assert not list(tmp_path.glob("*summary*"))


@pytest.mark.parametrize("bad", ["<", "&", "\x1b[31m"])
def test_odd_characters_in_reasons_stay_valid_xml(tmp_path, bad):
    df = F.results()
    df.loc[0, ["status", "reason", "value"]] = ["error", f"crash {bad} here", float("nan")]
    run = F.write_synthetic_run(tmp_path / "run", df)
    gate_run_dir(run, F.thresholds_toml(tmp_path / "t.toml"), baseline=None)
    fp8 = cases(run / "junit.xml")["synthetic.flux1/tiny/bf16/fp8/sp1/cpu"]
    assert "crash" in fp8.result[0].text


def test_junit_xml_is_a_string_with_declaration():
    from harness.gate import GateResult

    text = junit_xml(GateResult.error("no results"))
    assert text.startswith('<?xml version="1.0" encoding="utf-8"?>') and "GateError" in text
