"""Render a kdflow report in real headless Chromium and check what a reader would see.

    python scripts/check_report_browser.py .kdflow/reports/RUN_ID/report.html --screenshot report.png

Chromium (Debian: `apt-get install -y chromium`) opens a copy of the page with a probe script appended:
after the load event it writes every <img>'s decoded width into the DOM (0 when broken), which
`--dump-dom` returns and this script parses (a broken data URI decodes to nothing). A second run takes a
screenshot of the original page and checks that it holds colour, i.e. that the plots were painted.
Exit code 0 when everything passes; 1 with the problems listed otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

# Synchronous on purpose: the load event waits for every image, and --dump-dom waits for the load event,
# whereas a promise (img.decode()) may still be pending when a busy machine dumps the DOM.
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-decoded-width", String(img.complete ? img.naturalWidth : 0));
  }
  document.body.setAttribute("data-probe", "done");
});
</script>
"""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
]
# Pixels whose channels differ this much are coloured: text, borders and the white page never are.
SATURATION = 80


class DomSummary(HTMLParser):
    """Counts tables and collects <img> attributes and the probe's mark from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = 0
        self.images: list[dict[str, str | None]] = []
        self.probe_done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables += 1
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "body":
            self.probe_done = dict(attrs).get("data-probe") == "done"


def find_chromium(given: str | None) -> str:
    found = given or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        sys.exit("no Chromium found: install it (`apt-get install -y chromium`) or pass --chromium PATH")
    return found


def run_chromium(chromium: str, profile: Path, url: str, *extra: str) -> str:
    command = [chromium, *FLAGS, f"--user-data-dir={profile}", *extra, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        sys.exit(f"chromium failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def dom_problems(dom: str, min_tables: int, min_images: int) -> list[str]:
    summary = DomSummary()
    summary.feed(dom)
    problems = []
    if not summary.probe_done:
        problems.append("the probe script did not run: the page never finished loading")
    if summary.tables < min_tables:
        problems.append(f"{summary.tables} tables rendered, expected at least {min_tables}")
    if len(summary.images) < min_images:
        problems.append(f"{len(summary.images)} images rendered, expected at least {min_images}")
    for img in summary.images:
        if int(img.get("data-decoded-width") or 0) <= 0:
            problems.append(f"image {img.get('alt')!r} did not decode")
    return problems


def screenshot_problems(path: Path, min_coloured: int) -> list[str]:
    from matplotlib.image import imread

    if not path.exists() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return [f"no PNG screenshot at {path}"]
    pixels = imread(path)[..., :3]
    spread = (pixels.max(axis=-1) - pixels.min(axis=-1)) * 255
    coloured = int((spread > SATURATION).sum())
    if coloured < min_coloured:
        return [f"the screenshot has {coloured} coloured pixels (< {min_coloured}): the plots were not painted"]
    return []


def check(report: Path, screenshot: Path, chromium: str, min_tables: int, min_images: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="kdflow-chromium-") as tmp:
        tmp_dir = Path(tmp)
        probed = tmp_dir / "probed.html"
        probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        dom = run_chromium(chromium, tmp_dir / "profile-dom", probed.as_uri(), "--virtual-time-budget=10000",
                           "--dump-dom")
        problems = dom_problems(dom, min_tables, min_images)
        run_chromium(chromium, tmp_dir / "profile-shot", report.resolve().as_uri(), "--window-size=1280,6000",
                     f"--screenshot={screenshot.resolve()}")
    return problems + screenshot_problems(screenshot, min_coloured=500 * min_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.html written by kdflow")
    parser.add_argument("--screenshot", type=Path, help="PNG to write (default: beside the report)")
    parser.add_argument("--chromium", help="browser binary (default: chromium on PATH)")
    parser.add_argument("--min-tables", type=int, default=1)
    parser.add_argument("--min-images", type=int, default=1)
    args = parser.parse_args()
    if not args.report.is_file():
        sys.exit(f"no report at {args.report}: build one with `kdflow report RUN_ID`")
    screenshot = args.screenshot or args.report.with_name("report.png")
    problems = check(args.report, screenshot, find_chromium(args.chromium), args.min_tables, args.min_images)
    if problems:
        sys.exit("report check failed:\n  - " + "\n  - ".join(problems))
    print(f"ok: {args.report} renders in Chromium; screenshot {screenshot}")


if __name__ == "__main__":
    main()
