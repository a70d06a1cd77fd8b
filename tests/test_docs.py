"""The documentation site builds under `ci`, every page exists, every stored figure is embedded, no internal link is
broken, and (when Chromium is installed) the pages render with no console error and no missing resource."""
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from minicpm4_core import docs as D
from minicpm4_core import runner as R

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["nbs/04a_profiles", "tutorials/infllmv2"]   # a cheap subset, executed when no complete ci run exists


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    run = ROOT / "runs" / "ci"
    summary = run / "summary.json"
    done = {r["notebook"] for r in json.loads(summary.read_text())["results"] if r["status"] == "ok"} \
        if summary.exists() else set()
    if done >= {str(p.relative_to(ROOT)) for p in R.list_notebooks(ROOT)}:
        only = None                                   # a full ci run exists: build every page from it
    else:
        run = tmp_path_factory.mktemp("run_ci")
        R.run_notebooks("ci", only=QUICK, root=ROOT, out_dir=run)
        only = QUICK
    out = tmp_path_factory.mktemp("site")
    info = D.build_docs("ci", ROOT, run_dir=run, site_dir=out, only=only)
    return dict(info, only=only)


def _pages(nav):
    for entry in nav:
        for v in entry.values():
            yield from ([v] if isinstance(v, str) else _pages(v))


def test_every_page_exists(site):
    pages = list(_pages(site["nav"]))
    assert {"index.md", "results.md", "report.md", "tutorials/index.md"} <= set(pages)
    assert any(p.startswith("api/") for p in pages) and any(p.startswith("nbs/") for p in pages)
    for p in pages:
        html = site["site"] / re.sub(r"\.(md|ipynb)$", ".html", p)
        assert html.exists() and html.stat().st_size > 1000, f"page {p} missing from the site"
    assert site["warnings"] == [], site["warnings"]
    if site["only"]:
        assert set(site["executed"]) == {q + ".ipynb" for q in QUICK}


def test_every_stored_figure_is_embedded(site):
    page = (site["site"] / "results.html").read_text()
    # the site's copy of kernels/results/ (a snapshot taken when the site was staged) must all be shown
    stored = sorted(p.relative_to(site["site"]).as_posix() for p in (site["site"] / "kernels" / "results").rglob("*.png"))
    assert len(stored) >= 3, "no stored figure to check"
    for f in stored:
        assert f'src="{f}"' in page, f"{f} not shown on results.html"


def _links(text: str) -> list[str]:
    "href/src of the tags of an HTML page (not the text of code that shows HTML)."
    from html.parser import HTMLParser
    found = []
    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(v for k, v in attrs if k in ("href", "src") and v)
    P().feed(text)
    return found


def test_no_internal_link_is_broken(site):
    root, broken, n = site["site"], [], 0
    for page in root.rglob("*.html"):
        if "assets/mathjax" in page.as_posix() or page.name == "404.html": continue   # 404 links from the site root
        for url in _links(page.read_text(errors="replace")):
            u = urlsplit(url)
            if u.scheme or u.netloc or url.startswith(("#", "data:", "javascript:", "mailto:")): continue
            n += 1
            target = (page.parent / unquote(u.path)).resolve() if u.path else page
            if target.is_dir(): target = target / "index.html"
            if not target.exists(): broken.append(f"{page.relative_to(root)} -> {url}")
    assert n > 100 and not broken, broken[:20]


def test_notebook_pages_have_outputs_math_and_solutions(site):
    page = (site["site"] / "tutorials" / "infllmv2.html").read_text()
    assert "data:image/png;base64" in page or "<img" in page            # the executed figure is on the page
    assert "celltag_solution" in page and "minicpm4.js" in page          # collapsed by assets/minicpm4.js
    assert "assets/mathjax/MathJax.js" in page                          # math rendered offline: no CDN, no web font
    assert not re.search(r'<(script|link|img)[^>]+(src|href)=["\']https?://', page)
    assert "highlight" in page                                           # code highlighted
    assert "download" in page and "infllmv2.ipynb" in page               # link to the notebook


@pytest.mark.skipif(D.chromium() is None, reason="no Chromium (apt-get install -y chromium)")
def test_pages_render_in_chromium(site, tmp_path):
    shots = D.screenshots(site["site"], tmp_path, pages=("index.html", "tutorials/infllmv2.html", "report.html"))
    for page, s in shots.items():
        assert Path(s["png"]).stat().st_size > 10_000, f"{page}: blank screenshot"
        assert s["console"] == [] and s["missing"] == [], (page, s)


def test_syllabus_lists_every_tutorial():
    readme = (ROOT / "tutorials" / "README.md").read_text()
    missing = [p.name for p in (ROOT / "tutorials").glob("*.ipynb") if f"({p.name})" not in readme]
    assert not missing, f"tutorials/README.md does not list {missing}"
