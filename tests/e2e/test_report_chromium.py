"""A report renders its plots in a real browser: headless Chromium takes a screenshot.

Needs Debian's `chromium` on PATH (CI installs it: `apt-get install -y chromium`).
The screenshot must show the plot: matplotlib's first line colour (#1f77b4) covers a
visible number of pixels, which only happens when the embedded PNG was decoded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_report import make_run  # noqa: E402

from graftlm.report import write_report  # noqa: E402


def screenshot(html: Path, png: Path, profile: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: run `apt-get install -y chromium` (Debian) to render reports"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,2000",
                    html.resolve().as_uri()], check=True, timeout=120, capture_output=True)


@pytest.mark.slow
def test_report_renders_its_plots_in_headless_chromium(tmp_path):
    from PIL import Image
    report = write_report(make_run(tmp_path, "run"))
    png = tmp_path / "report.png"
    screenshot(report, png, tmp_path / "profile")
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 2000)
    blue = sum(1 for r, g, b in image.getdata() if abs(r - 0x1f) < 40 and abs(g - 0x77) < 40 and abs(b - 0xb4) < 40)
    assert blue > 500, f"the plot's lines are not visible in the screenshot ({blue} blue pixels)"
