"""Gemma 4 unified (issue 13): our encoder-free embedders and the quantized language model against transformers'
gemma4_unified, through the token-logits sweep and the same gate as every other family. One run of the whole
`gemma` suite (module fixture) backs the fp32 and quant checks; the selftest reuses its reference outputs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import token_metrics as T
from harness import token_sweep as S
from harness.metrics import MetricError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gemma_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("gemma4-unified", "tiny", seed=0, root=zoo_root)


@pytest.fixture(scope="module")
def refs():
    return {}  # the reference's outputs, shared by every run of this module


@pytest.fixture(scope="module")
def suite_run(gemma_dir, refs, tmp_path_factory, one_thread):
    suite = S.load_suite("gemma")
    code, results = S.run(suite, tmp_path_factory.mktemp("gemma") / "run", model_dirs={"gemma4-unified": gemma_dir},
                          refs=refs, log=lambda m: None)
    return code, results


def test_fp32_engine_is_bitwise_transformers(suite_run):
    """Must show: embedder cosine, logits cosine, top-1 100%, 16 greedy tokens identical -- measured exactly equal."""
    code, df = suite_run
    assert code == 0
    fp32 = df[df.quant == "none"]
    assert set(fp32.status) == {"ok"} and len(fp32) == S.expected_rows(S.load_suite("gemma"))
    want = {"embedder_cosine_min": 1.0, "embedder_rel_error": 0.0, "logits_cosine_min": 1.0, "top1_agreement": 1.0,
            "next_token_kl_max": 0.0, "greedy_match_rate": 1.0}
    for metric, value in want.items():
        got = fp32[fp32.metric == metric].value
        assert len(got) and (got == value).all(), (metric, got.tolist())
    # all three prompt kinds (text+image, text+audio, text+image+audio) and both embedders were compared
    assert set(fp32[fp32.metric == "embedder_cosine_min"].layer) == {"image_embedder", "audio_embedder"}


def test_quant_cells_are_measured_and_gated(suite_run):
    code, df = suite_run
    quant = df[df.quant != "none"]
    assert set(quant.quant) == {"fp8", "fp8-wo", "nvfp4-wo", "mxfp4"} and set(quant.status) == {"ok"}
    for mode, rows in quant.groupby("quant"):
        logits = rows[rows.metric == "logits_cosine_min"].value
        kl = rows[rows.metric == "next_token_kl_max"].value
        assert (logits < 1).all() and (kl > 0).all(), mode  # quantization is really on, and gated (code 0 above)
        assert (rows.quantized_fraction > 0).all(), mode


def test_every_planted_bug_fails_the_gate(gemma_dir, refs):
    suite = S.load_suite("gemma")
    code, matrix = S.selftest(suite, model_dirs={"gemma4-unified": gemma_dir}, refs=refs, log=lambda m: None)
    assert code == 0, matrix.to_string()
    caught = dict(zip(matrix.plant, matrix.caught_by))
    assert set(caught) == {"gemma_position_axes_swapped", "gemma_padding_positions_unmasked",
                           "gemma_projection_norm_scaled", "gemma_audio_padding_multiple",
                           "gemma_image_one_token_late"}
    assert "embedder_cosine_min" in caught["gemma_position_axes_swapped"]
    # padding rows are dropped before placement: only the embedder's own output can show this one
    assert caught["gemma_padding_positions_unmasked"] == "embedder_cosine_min, embedder_rel_error"
    assert "embedder_rel_error" in caught["gemma_projection_norm_scaled"]
    assert "embedder_cosine_min" in caught["gemma_audio_padding_multiple"]  # a frame too many: shapes differ
    assert "logits_cosine_min" in caught["gemma_image_one_token_late"]


def test_embedder_pieces():
    from engine.models import gemma4_unified as G

    frames = G.audio_frames(torch.arange(70.0), 32)
    assert frames.shape == (3, 32) and frames[2, 6:].eq(0).all() and frames[2, 5] == 69
    table = torch.randn(8, 2, 4)
    pos = torch.tensor([[2, 5], [-1, -1]])
    emb = G.factorized_position_embedding(table, pos)
    assert torch.equal(emb[0], table[2, 0] + table[5, 1]) and emb[1].eq(0).all()
    x = torch.randn(3, 6) * 5
    assert torch.allclose(G.rms_norm_no_scale(x, 1e-6).pow(2).mean(-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="2 placeholder tokens .* but 3 embeddings"):
        G.place(torch.zeros(1, 4, 6), torch.tensor([[1, 7, 7, 2]]), 7, torch.ones(3, 6))


def test_token_metrics_refuse_nan_and_mismatch():
    logits = torch.randn(5, 11)
    bad = logits.clone()
    bad[2, 3] = float("nan")
    for fn in (T.logits_cosine_min, T.top1_agreement, T.next_token_kl_max):
        with pytest.raises(MetricError, match="NaN"):
            fn(bad, logits)
    with pytest.raises(MetricError, match="test has 15 tokens, reference 16"):
        T.greedy_match_rate(torch.arange(15), torch.arange(16))
    assert T.top1_agreement(logits, logits.roll(1, dims=0)) < 1


def test_bad_suite_is_a_clear_error(tmp_path):
    text = S.suite_path("gemma").read_text().replace('"mxfp4"]', '"mxfp5"]')
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(S.TokenSuiteError, match="unknown quant mode 'mxfp5'; valid"):
        S.load_suite(str(tmp_path / "bad.toml"))
    assert S.main(["--suite", str(tmp_path / "bad.toml")]) == 2
    with pytest.raises(S.TokenSuiteError, match="marks 1 images"):
        S.load_suite(str(_write(tmp_path, text.replace('images = [[20, 30]]', 'images = [[20, 30], [10, 10]]', 1))))


def _write(tmp_path, text):
    path = tmp_path / "bad2.toml"
    path.write_text(text)
    return path


def test_suite_cells_are_data():
    suite = S.load_suite("gemma")
    assert dataclasses.is_dataclass(suite) and [c.quant for c in suite.cells] == [
        "none", "fp8", "fp8-wo", "nvfp4-wo", "mxfp4"]


def test_diffusion_runs_do_not_expect_token_metrics():
    """Token-logits metrics are gated like the others but only token suites produce them: a diffusion sweep's
    expected rows and crashed-cell error rows list media metrics only."""
    from harness import selfcheck, sweep
    from harness.metrics import METRICS

    tokens = {m for m, s in METRICS.items() if s.output == "tokens"}
    assert tokens == {"embedder_cosine_min", "embedder_rel_error", "logits_cosine_min", "top1_agreement",
                      "next_token_kl_max", "greedy_match_rate"}
    assert not tokens & set(sweep.ENGINE_METRICS)
    from engine.api import OptimizeSpec

    cell = type("Cell", (), {"name": "c", "quant": "fp8", "parallel": "sp1", "golden": False, "sampling": None,
                             "optimize": OptimizeSpec()})()
    planned = {key.split("|")[2] for key in selfcheck.expected_rows([cell], 1, 1, golden=False, clip=False)}
    assert planned and not tokens & planned


def test_every_gemma_cell_has_a_threshold_for_every_token_metric():
    from harness.metrics import METRICS
    from harness.thresholds import load_thresholds

    rules = load_thresholds()
    for cell in S.load_suite("gemma").cells:
        for metric in (m for m, s in METRICS.items() if s.output == "tokens"):
            rule = rules.lookup((cell.model, cell.dtype, cell.quant, "sp1", "engine_vs_reference", metric))
            assert rule is not None and rule.source, (cell.name, metric)
