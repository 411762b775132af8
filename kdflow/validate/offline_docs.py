"""Great Expectations Data Docs that render without a network.

GX's page templates load jQuery, Bootstrap 4, bootstrap-table (which builds the index page's tables from
inline data: without it the index is empty), bootstrap-datepicker, Font Awesome and Vega from CDNs, and its
logo from S3. `make_offline(site)` copies local copies into the site (`static/offline/`) and rewrites every
page's <script>/<link>/<img> tags to them, relative to the page, so the site opens from disk, from kdflow's
local file server or from a copy on another machine.

Where the files come from: the XStatic packages on PyPI (jQuery 3.7.1, the version GX asks for; Bootstrap
4.5 with its Popper bundle, API-compatible with GX's 4.3; Font Awesome 6; bootstrap-datepicker), and
bootstrap-table 1.19.1 with its filter-control extension, which no PyPI package ships, from its npm release
(MIT, kept in `docs_assets/` with its licence). Vega is dropped: only profiling pages draw charts, and
kdflow's suites produce none; Popper is inside Bootstrap's bundle; the dark-mode stylesheet is dropped.
"""

from __future__ import annotations

import os
import re
import shutil
from importlib import import_module
from pathlib import Path

OFFLINE_DIR = "static/offline"
_VENDORED = Path(__file__).with_name("docs_assets")

# (where the file lies: an XStatic module or "vendored", path inside it) -> path under static/offline/.
_FILES = {
    ("xstatic.pkg.jquery", "jquery.min.js"): "jquery/jquery.min.js",
    ("xstatic.pkg.bootstrap", "css/bootstrap.min.css"): "bootstrap/css/bootstrap.min.css",
    ("xstatic.pkg.bootstrap", "js/bootstrap.bundle.min.js"): "bootstrap/js/bootstrap.bundle.min.js",
    ("xstatic.pkg.font_awesome", "css/all.min.css"): "font-awesome/css/all.min.css",
    ("xstatic.pkg.bootstrap_datepicker", "bootstrap-datepicker.js"): "bootstrap-datepicker/bootstrap-datepicker.js",
    ("xstatic.pkg.bootstrap_datepicker", "bootstrap-datepicker3.standalone.css"):
        "bootstrap-datepicker/bootstrap-datepicker3.standalone.css",
    ("vendored", "bootstrap-table/bootstrap-table.min.js"): "bootstrap-table/bootstrap-table.min.js",
    ("vendored", "bootstrap-table/bootstrap-table.min.css"): "bootstrap-table/bootstrap-table.min.css",
    ("vendored", "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.js"):
        "bootstrap-table/filter-control.min.js",
    ("vendored", "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.css"):
        "bootstrap-table/filter-control.min.css",
    ("vendored", "bootstrap-table/LICENSE"): "bootstrap-table/LICENSE",
}

# A CDN or S3 address (regular expression) -> the local file under static/offline/ (or, starting with
# "static/", under the site), or None to drop the tag.
_RULES: list[tuple[str, str | None]] = [
    (r"https://code\.jquery\.com/jquery-3\.[\d.]+(\.min)?\.js", "jquery/jquery.min.js"),
    (r"https://[\w.]+/bootstrap/4\.[\d.]+/css/bootstrap(\.min)?\.css", "bootstrap/css/bootstrap.min.css"),
    (r"https://[\w.]+/bootstrap/4\.[\d.]+/js/bootstrap(\.bundle)?(\.min)?\.js", "bootstrap/js/bootstrap.bundle.min.js"),
    (r"https://[\w./-]+/popper\.js/1\.[\d.]+/umd/popper(\.min)?\.js", None),
    (r"https://[\w./-]+/font-awesome/6\.[\d.]+/css/all(\.min)?\.css", "font-awesome/css/all.min.css"),
    (r"https://[\w./-]+/bootstrap-datepicker/1\.[\d.]+/js/bootstrap-datepicker(\.min)?\.js",
     "bootstrap-datepicker/bootstrap-datepicker.js"),
    (r"https://[\w./-]+/bootstrap-datepicker/1\.[\d.]+/css/bootstrap-datepicker(3)?(\.standalone)?(\.min)?\.css",
     "bootstrap-datepicker/bootstrap-datepicker3.standalone.css"),
    (r"https://unpkg\.com/bootstrap-table@1\.[\d.]+/dist/bootstrap-table(\.min)?\.js",
     "bootstrap-table/bootstrap-table.min.js"),
    (r"https://unpkg\.com/bootstrap-table@1\.[\d.]+/dist/bootstrap-table(\.min)?\.css",
     "bootstrap-table/bootstrap-table.min.css"),
    (r"https://unpkg\.com/bootstrap-table@1\.[\d.]+/dist/extensions/filter-control/"
     r"bootstrap-table-filter-control(\.min)?\.js", "bootstrap-table/filter-control.min.js"),
    (r"https://unpkg\.com/bootstrap-table@1\.[\d.]+/dist/extensions/filter-control/"
     r"bootstrap-table-filter-control(\.min)?\.css", "bootstrap-table/filter-control.min.css"),
    (r"https://cdn\.jsdelivr\.net/npm/vega(-lite|-embed)?@\d+", None),
    (r"https://cdn\.jsdelivr\.net/npm/@forevolve/bootstrap-dark@[\d.]+/[\w./-]+", None),
    (r"https://great-expectations-web-assets\.s3\.[\w.-]+/[\w.-]+\.png(\?[^\"]*)?", "static/images/logo-long.png"),
]
# A tag that loads something: its address in src, href or srcset.
_TAG = re.compile(
    r"<(?P<tag>script|link|img|source)\b(?P<attrs>[^>]*?)\b(?P<attr>src|href|srcset)=\"(?P<url>https?://[^\"]+)\""
    r"(?P<rest>[^>]*)>(?P<close>\s*</script>)?",
    re.IGNORECASE,
)
_CSS_URL = re.compile(r"url\(['\"]?(?P<url>https?://[^'\")]+)['\"]?\)")
# Subresource integrity names the CDN file's hash; the local copy is another build.
_INTEGRITY = re.compile(r"\s(integrity|crossorigin)=\"[^\"]*\"")


class OfflineDocsError(RuntimeError):
    """A file the offline Data Docs need is missing: an XStatic package is not installed."""


def copy_assets(site: Path) -> None:
    """Copy the local libraries into `site`/static/offline (Font Awesome's web fonts too).

    Raises OfflineDocsError naming the package to install when an XStatic package is missing."""
    target = site / OFFLINE_DIR
    for (source, inner), local in _FILES.items():
        origin = _VENDORED / inner if source == "vendored" else _xstatic_dir(source) / inner
        (target / local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, target / local)
    fonts = _xstatic_dir("xstatic.pkg.font_awesome") / "webfonts"
    (target / "font-awesome" / "webfonts").mkdir(parents=True, exist_ok=True)
    for font in fonts.glob("*.woff2"):  # every browser that runs the pages reads woff2; the .ttf fallbacks are not needed
        shutil.copyfile(font, target / "font-awesome" / "webfonts" / font.name)


def _xstatic_dir(module: str) -> Path:
    try:
        return Path(import_module(module).BASE_DIR)
    except ImportError:
        package = "XStatic-" + module.rsplit(".", 1)[-1].replace("_", "-")
        raise OfflineDocsError(f"offline Data Docs need {module}: pip install {package}") from None


def rewrite_page(html: str, page: Path, site: Path) -> str:
    """`html` with every known CDN tag (and inline CSS `url(...)`) pointing at the site's local copy (a path
    relative to `page`), or removed where the page does not need it; an unknown address is left as it is."""

    def local(url: str) -> str | None:
        """The local path for `url`; "" to drop it; None when the address is not a known one."""
        for pattern, target in _RULES:
            if re.fullmatch(pattern, url):
                if target is None:
                    return ""
                path = site / target if target.startswith("static/") else site / OFFLINE_DIR / target
                return Path(os.path.relpath(path, page.parent)).as_posix()
        return None

    def tag(match: re.Match[str]) -> str:
        path = local(match["url"])
        if path is None:
            return match[0]
        if not path:
            return ""
        attrs, rest = _INTEGRITY.sub("", match["attrs"]), _INTEGRITY.sub("", match["rest"])
        return f"<{match['tag']}{attrs}{match['attr']}=\"{path}\"{rest}>{match['close'] or ''}"

    def css(match: re.Match[str]) -> str:
        path = local(match["url"])
        return match[0] if path is None else f"url('{path}')"

    return _CSS_URL.sub(css, _TAG.sub(tag, html))


def make_offline(site: Path) -> None:
    """Make the Data Docs site under `site` (the folder of its index.html) render without a network: copy
    the libraries and rewrite every page. Idempotent (a rebuilt site is rewritten again).

    Raises OfflineDocsError when an XStatic package is missing."""
    copy_assets(site)
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        rewritten = rewrite_page(text, page, site)
        if rewritten != text:
            page.write_text(rewritten, encoding="utf-8")
