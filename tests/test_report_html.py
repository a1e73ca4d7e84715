"""report.html on a small synthetic run: what it holds (verdict first, thresholds with margins, image triplets,
frames side by side, plots), that it reaches for nothing outside itself, and that a real browser (headless
Chromium, Debian's `chromium` package; harness/browser.py) renders the verdict, every image and every plot."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import report_fixtures as F
from harness import browser, html_report
from harness.runfiles import load_results
from harness.verdict import gate_run_dir


@pytest.fixture
def gated_run(tmp_path):
    run = F.write_synthetic_run(tmp_path / "run")
    code = gate_run_dir(run, F.thresholds_toml(tmp_path / "t.toml"), baseline=None)
    assert code == 0
    return run


def test_as_frames_accepts_images_and_videos():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    videos = np.zeros((2, 5, 8, 8, 3), np.uint8)
    assert [len(s) for s in html_report.as_frames(images)] == [1, 1]
    assert [len(s) for s in html_report.as_frames(videos)] == [5, 5]
    assert html_report.as_frames(videos)[1][4].shape == (8, 8, 3)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) or \(B, F, H, W, 3\)"):
        html_report.as_frames(np.zeros((8, 8, 3), np.uint8))


def test_diff_map_amplifies_and_is_black_where_equal():
    ref = np.full((4, 4, 3), 100, np.uint8)
    eng = ref.copy()
    eng[0, 0, 1] = 102  # 2/255 off in one channel -> 16/255 after the x8 gain
    d = html_report.diff_map(eng, ref)
    assert d.shape == (4, 4, 3) and d.dtype == np.uint8
    assert d[1:, 1:].max() == d[3, 3].max() and d[0, 0].sum() > d[3, 3].sum()


def test_diff_map_colours_follow_magma():
    """The table stands in for matplotlib's magma (which the report no longer imports): within 3/255 of it."""
    from matplotlib import colormaps

    full = (colormaps["magma"](np.arange(256) / 255)[:, :3] * 255).round()
    assert np.abs(html_report._MAGMA.astype(float) - full).max() <= 3


def test_frames_are_grouped_and_ordered(tmp_path):
    for name in ("seed1_p0_f10_engine", "seed1_p0_f2_engine", "seed1_p0_f10_reference", "seed1_p0_f2_reference",
                 "seed0_p0_engine", "seed0_p0_reference", "seed0_p1_engine"):
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / f"{name}.png")
    found = html_report.find_media(tmp_path)
    assert list(found) == ["seed0_p0", "seed0_p1", "seed1_p0"]
    assert [f["engine"].name for f in found["seed1_p0"]] == ["seed1_p0_f2_engine.png", "seed1_p0_f10_engine.png"]
    assert "reference" not in found["seed0_p1"][0]  # one side only: reported, not drawn


def test_report_content(gated_run):
    text = (gated_run / "report.html").read_text()
    verdict_at, first_cell = text.index("id='verdict'"), text.index("id='cell0'")
    assert verdict_at < first_cell and ">PASS</div>" in text[:first_cell]
    # Margins per threshold: fp8 single-step cosine, worst sample 0.9984 vs >= 0.997.
    assert "<td>single_step_cosine</td><td>0.9984</td><td>&gt;= 0.997</td><td>+0.0014</td>" in text
    # 2 fp8 + 2 fp32 samples x (engine, reference, diff) + the video cell 2 samples x 3 frames x 3.
    assert text.count("<img class=\"media\"") == 2 * 3 + 2 * 3 + 2 * 3 * 3
    assert text.count('<img class="plot" src="data:image/svg+xml;base64,') == 2  # fp8 trajectory + weights; fp32 exact
    assert "exactly 1 at every step (bitwise equal)" in text
    assert "frame 2" in text
    # Weight SQNR worst first.
    assert text.index("blocks.1.fc") < text.index("blocks.5.fc") < text.index("blocks.3.fc")
    # Self-contained: no URL that would reach out of the file.
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)


def test_failing_report_says_fail_first(tmp_path):
    run = F.write_synthetic_run(tmp_path / "run", F.results(psnr_fp8=20.0))
    assert gate_run_dir(run, F.thresholds_toml(tmp_path / "t.toml"), baseline=None) == 1
    text = (run / "report.html").read_text()
    assert "class='verdict FAIL'>FAIL</div>" in text
    assert "<td class='FAIL'>FAIL</td><td>engine_vs_reference</td><td>psnr_db</td><td>20</td>" in text


def test_ungated_report_renders(tmp_path):
    run = F.write_synthetic_run(tmp_path / "run")
    html_report.write_html(run, load_results(run), None)
    assert "NOT GATED" in (run / "report.html").read_text()


def test_rendering_imports_no_plotting_library(tmp_path):
    """Plots are SVG text and the diff map's colours a table: rendering imports no matplotlib at all, so it can
    change no global plotting state (checked in a fresh process, since other tests may import it)."""
    run = F.write_synthetic_run(tmp_path / "run")
    code = ("import sys; from harness import html_report; from harness.runfiles import load_results; "
            f"html_report.write_html({str(run)!r}, load_results({str(run)!r}), None); "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'matplotlib'], 'matplotlib imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_browser_renders_verdict_images_and_plots(gated_run):
    page = gated_run / "report.html"
    probe = browser.probe(page)
    assert probe["verdict"] == "PASS" and probe["verdictHeight"] > 0
    imgs = probe["imgs"]
    assert len(imgs) == 30 + 2
    assert browser.broken(probe) == []
    browser.screenshot(page, gated_run / "report.png")
    plots = [w for alt, _, w, _ in imgs if "plot" in alt]
    assert len(plots) == 2 and min(plots) >= 300
    shot = np.asarray(Image.open(gated_run / "report.png").convert("RGB"))
    assert shot.std() > 10  # not a blank page


@pytest.mark.parametrize("kind, what", [("png", "engine"), ("svg+xml", "plot")])
def test_browser_check_catches_a_broken_image(gated_run, kind, what):
    """The check can fail: the first image (a PNG) or plot (an SVG) has its data corrupted, and the browser reports
    it with width 0."""
    page = gated_run / "report.html"
    text = page.read_text()
    start = text.index(f'src="data:image/{kind};base64,') + len(f'src="data:image/{kind};base64,')
    page.write_text(text[:start] + "AAAA" + text[start + 4:])
    (bad,) = browser.broken(browser.probe(page))
    assert what in bad
