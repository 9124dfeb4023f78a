"""The docs site: the strict build passes and executes every page; a broken example or a stale
test reference fails it; the built pages render their maths and figures in headless Chromium.

The build tests skip when the docs tools are not installed (the ``docs`` extra); the browser
test also skips when playwright or a system Chromium is missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_TOOLS = ("sphinx", "myst_nb", "numpydoc", "furo", "ipykernel", "matplotlib", "sphinx-mathjax-offline")
MISSING = [m for m in DOCS_TOOLS if importlib.util.find_spec(m) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"docs tools not installed: {MISSING} (the docs extra)"),
]


def sphinx_build(src: Path, out: Path, *extra: str, confdir: Path | None = None):
    """Run the strict build (warnings are errors); returns (return code, combined output)."""
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-j", "2",
           "-d", str(out / "doctrees"), *extra, str(src), str(out / "html")]
    if confdir is not None:
        cmd[3:3] = ["-c", str(confdir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ),
                          check=False)
    return proc.returncode, proc.stdout + proc.stderr


def notebook_pages() -> list[str]:
    """Docnames of the executed (MyST-NB) pages written in docs/ by hand."""
    pages = []
    for path in sorted(DOCS.rglob("*.md")):
        rel = path.relative_to(DOCS)
        if rel.parts[0] in ("_build", "reference") or "file_format: mystnb" not in path.read_text():
            continue
        pages.append(rel.with_suffix("").as_posix())
    return pages


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    rc, log = sphinx_build(DOCS, out)
    return rc, log, out / "html"


def test_strict_build_passes(site):
    """The whole site builds with warnings as errors, every notebook page executed."""
    rc, log, _ = site
    problems = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|Error|Traceback", line)
                and "IPKernelApp" not in line]
    assert rc == 0, "docs build failed:\n" + "\n".join(problems[-40:] or log.splitlines()[-40:])


def test_every_executed_page_has_outputs_and_rendered_figures(site):
    """Each notebook page shows its executed outputs and no path of the checkout (warnings print
    one); operation pages and the differences page show at least one figure, and no figure is
    left as a bare text repr."""
    rc, _, html = site
    assert rc == 0
    pages = notebook_pages()
    assert {"ops/batchtopk", "tutorials/train-numpy", "differences"} <= set(pages)
    for page in pages:
        text = (html / f"{page}.html").read_text()
        assert "cell_output" in text, f"{page}: no executed output"
        assert "&lt;Figure size" not in text, f"{page}: a figure was not rendered as an image"
        assert str(ROOT) not in text, f"{page}: an output shows a path of the checkout (a warning?)"
        if page.startswith("ops/") or page == "differences":
            assert re.search(r'<img [^>]*src="[^"]*_images/', text), f"{page}: no figure"


def test_operation_pages_show_source_and_link_their_invariants_to_the_tests(site):
    """Every operation page includes code from the package and a table of property tests whose
    links resolve to the generated test pages."""
    rc, _, html = site
    assert rc == 0
    for page in notebook_pages():
        if not page.startswith("ops/"):
            continue
        text = (html / f"{page}.html").read_text()
        assert "highlight-python" in text, f"{page}: no source shown"
        links = re.findall(r'<table class="[^"]*sae-invariants[^"]*".*?</table>', text, re.DOTALL)
        assert links, f"{page}: no invariants table"
        targets = re.findall(r'href="\.\./reference/tests/(test_\w+)\.html#([\w-]+)"', links[0])
        assert targets, f"{page}: the invariants table links to no test"
        for stem, anchor in targets:
            assert f'id="{anchor}"' in (html / "reference" / "tests" / f"{stem}.html").read_text()


def test_api_reference_has_a_page_per_public_module(site):
    rc, _, html = site
    assert rc == 0
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from saeref_docs import public_modules
    finally:
        sys.path.pop(0)
    modules = public_modules()
    assert "sae_ref.activations" in modules and "sae_ref.backends" in modules
    for mod in modules:
        assert (html / "reference" / "api" / f"{mod}.html").is_file(), mod


def test_source_pages_link_back_to_the_object_they_show(site):
    """Every "[docs]" link of a source page (sphinx.ext.viewcode) names an anchor that its API
    page has, so it lands on the object, not at the top of the page; objects re-exported by a
    package (``sae_ref.resolve`` of ``sae_ref.arrays``) included."""
    rc, _, html = site
    assert rc == 0
    links = 0
    for page in sorted((html / "_modules").rglob("*.html")):
        for href, anchor in re.findall(r'<a class="viewcode-back" href="([^"#]*)#([^"]*)"',
                                       page.read_text()):
            links += 1
            target = (page.parent / href).resolve()
            assert target.is_file(), f"{page.name}: {href} does not exist"
            assert f'id="{anchor}"' in target.read_text(), f"{page.name}: {href}#{anchor}"
    assert links > 100
    arrays = (html / "_modules" / "sae_ref" / "arrays.html").read_text()
    assert 'sae_ref.arrays.html#sae_ref.arrays.resolve"' in arrays


UNDOCUMENTED = (
    'def test_documented():\n    """Says what it checks."""\n\n\n'
    "def test_bare():\n    assert True\n")

#: name -> (the page, text the build's log must show, test files of the site's own tests/)
BROKEN_PAGES = {
    "a failing code cell": (
        ("---\nfile_format: mystnb\nkernelspec:\n  name: python3\n---\n\n"
         "# Broken\n\n```{code-cell} ipython3\nraise ValueError('broken on purpose')\n```\n"),
        "broken on purpose", {}),
    "a test that does not exist": (
        ("# Stale\n\n```{sae-invariants} tests/test_activations.py\n"
         ":names: test_that_does_not_exist\n```\n"),
        "test_that_does_not_exist", {}),
    "a listed test without a docstring": (
        "# Bare\n\n```{sae-invariants} tests/test_undocumented.py\n:match: .\n```\n",
        "without a docstring: ['tests/test_undocumented.py::test_bare']",
        {"test_undocumented.py": UNDOCUMENTED}),
}


@pytest.mark.parametrize("case", sorted(BROKEN_PAGES))
def test_a_broken_page_fails_the_strict_build(case, tmp_path):
    """The site's own configuration refuses a page with a failing example, a table citing a
    test that is not in tests/, or a table listing a test without a docstring (a one-page site
    built with docs/conf.py)."""
    text, message, test_files = BROKEN_PAGES[case]
    src = tmp_path / "src"
    src.mkdir()
    (src / "index.md").write_text(text)
    conf = ("import runpy\n"
            "settings = runpy.run_path(CONF)\n"
            "globals().update({k: v for k, v in settings.items() if not k.startswith('__')})\n"
            "html_static_path = [STATIC]\n"
            "saeref_generate_pages = False\n")
    conf = conf.replace("CONF", repr(str(DOCS / "conf.py"))).replace("STATIC", repr(str(DOCS / "_static")))
    if test_files:
        tests = tmp_path / "tests"
        tests.mkdir()
        for name, body in test_files.items():
            (tests / name).write_text(body)
        conf += f"saeref_tests_dir = {str(tests)!r}\n"
    (src / "conf.py").write_text(conf)
    rc, log = sphinx_build(src, tmp_path / "out")
    assert rc != 0, f"the build passed with {case}"
    assert message in log


def test_a_table_of_documented_tests_passes_the_docstring_check(tmp_path):
    """The counterpart of the case above: the same one-page site listing only the documented
    test raises no docstring error, so the refusal is the docstring's doing. (The table's links
    to test pages that this one-page site does not generate may still warn.)"""
    src = tmp_path / "src"
    src.mkdir()
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_undocumented.py").write_text(UNDOCUMENTED)
    (src / "index.md").write_text("# Documented\n\n```{sae-invariants} tests/test_undocumented.py\n"
                                  ":names: test_documented\n```\n")
    conf = ("import runpy\n"
            f"settings = runpy.run_path({str(DOCS / 'conf.py')!r})\n"
            "globals().update({k: v for k, v in settings.items() if not k.startswith('__')})\n"
            f"html_static_path = [{str(DOCS / '_static')!r}]\n"
            "saeref_generate_pages = False\n"
            f"saeref_tests_dir = {str(tests)!r}\n")
    (src / "conf.py").write_text(conf)
    _, log = sphinx_build(src, tmp_path / "out")
    assert "sae-invariants" not in log, log[-2000:]
    assert (tmp_path / "out" / "html" / "index.html").is_file()


def test_maths_and_figures_render_in_headless_chromium(site, tmp_path):
    """The BatchTopK page and the first tutorial, opened in Chromium from a local server: MathJax
    (shipped with the site) typesets every formula without errors, no TeX is left in the text,
    every image loads, no display equation or code block is wider than the text column, and
    nothing is fetched from outside the site. A copy of the BatchTopK page given an equation
    and a code line far wider than the column fails the width check."""
    pytest.importorskip("playwright")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import docs_screenshots as shots
    finally:
        sys.path.pop(0)
    chromium = shots.find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    rc, _, html = site
    assert rc == 0
    reports = shots.run(html, tmp_path, list(shots.KEY_PAGES), chromium)
    for r in reports:
        assert not r["failures"], f"{r['page']}: {r['failures']}"
        assert r["mathjax_rendered"] >= 10 and r["images"] >= 1
        full_page, *close_ups = (Path(p).stat().st_size for p in r["screenshots"])
        assert full_page > 50_000 and all(size > 500 for size in close_ups)
    page = (html / "ops" / "batchtopk.html").read_text()
    wide_tex = "+".join(f"x_{{{i}}}" for i in range(120))
    wide_code = "y = " + " + ".join(f"x{i}" for i in range(60))
    extra = (f'<div class="math notranslate nohighlight">\\[{wide_tex}\\]</div>'
             f'<div class="cell_input"><div class="highlight-ipython3"><div class="highlight">'
             f"<pre>{wide_code}</pre></div></div></div>")
    marker = '<section id="the-equation">'
    assert marker in page
    (html / "ops" / "too-wide.html").write_text(page.replace(marker, marker + extra, 1))
    (wide,) = shots.run(html, tmp_path, ["ops/too-wide.html"], chromium)
    kinds = {b["kind"] for b in wide["too_wide"]}
    assert kinds == {"equation", "code"}, wide["too_wide"]
    assert any("wider than the" in f for f in wide["failures"])
