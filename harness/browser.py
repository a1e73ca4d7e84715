"""Open a report.html in headless Chromium (Debian's `chromium` package): check that the verdict, every image and
every plot rendered, and save a screenshot.

    python -m harness.browser reports/<run>     # writes reports/<run>/report.png, exit 1 if anything is broken
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Added to a copy of the page: after load, record every <img>'s natural size and the verdict's box.
_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);
  const v = document.getElementById('verdict');
  const r = v ? v.getBoundingClientRect() : null;
  document.body.setAttribute('data-probe', JSON.stringify({imgs, verdict: v ? v.textContent : null,
                                                          verdictHeight: r ? r.height : 0}));
});</script></body>"""


class BrowserError(RuntimeError):
    pass


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise BrowserError("headless Chromium not found: apt-get install -y chromium (the Debian package)")
    return exe


def _run(args: list[str], profile: str) -> subprocess.CompletedProcess:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-extensions", f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=180)


def probe(page: str | Path) -> dict:
    """{'imgs': [[alt, complete, naturalWidth, naturalHeight], ...], 'verdict': text, 'verdictHeight': px}."""
    page = Path(page).resolve()
    with tempfile.TemporaryDirectory(prefix="parity-chromium-") as profile:
        copy = page.with_name(f".probe-{page.name}")  # same folder: relative image paths keep working
        copy.write_text(page.read_text().replace("</body>", _PROBE))
        try:
            out = _run(["--dump-dom", copy.as_uri()], profile)
        finally:
            copy.unlink(missing_ok=True)
    m = re.search(r'data-probe="([^"]*)"', out.stdout)
    if out.returncode != 0 or not m:
        raise BrowserError(f"chromium did not render {page} (exit {out.returncode}): {out.stderr[-1500:]}")
    return json.loads(html.unescape(m.group(1)))


def screenshot(page: str | Path, png: str | Path, width: int = 1400, height: int = 2400) -> Path:
    page, png = Path(page).resolve(), Path(png).resolve()
    with tempfile.TemporaryDirectory(prefix="parity-chromium-") as profile:
        out = _run([f"--window-size={width},{height}", f"--screenshot={png}", page.as_uri()], profile)
    if out.returncode != 0 or not png.is_file():
        raise BrowserError(f"chromium could not screenshot {page}: {out.stderr[-1500:]}")
    return png


def broken(result: dict) -> list[str]:
    """What did not render: images that never loaded or have no pixels, a missing or invisible verdict."""
    bad = [alt for alt, complete, w, h in result["imgs"] if not (complete and w > 0 and h > 0)]
    if not result.get("verdict") or not result.get("verdictHeight"):
        bad.append("the verdict")
    return bad


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    run = Path(args[0])
    page = run / "report.html" if run.is_dir() else run
    result = probe(page)
    shot = screenshot(page, page.with_suffix(".png"))
    bad = broken(result)
    print(f"{page}: verdict {result['verdict']!r}, {len(result['imgs'])} images, {len(bad)} broken {bad}; "
          f"screenshot {shot}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
