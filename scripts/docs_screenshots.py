"""Open the built docs in headless Chromium, check that maths and figures render, screenshot.

Usage (after building the site into docs/_build/html)::

    python scripts/docs_screenshots.py [--html docs/_build/html] [--out docs/_build/screenshots]
                                       [--chromium /usr/bin/chromium] [PAGE ...]

PAGE defaults to every hand-written page of the site (the operations, the tutorials and the
top-level pages; not the generated reference). The site is served from a local HTTP server on
127.0.0.1; the browser is the system's Chromium driven by playwright (``pip install
playwright``; ``apt-get install chromium``; playwright's own browser download is not needed).
Per page, in a 1280 x 900 window, it checks:

- MathJax typeset every maths node (as many ``mjx-container`` as maths nodes), no
  ``mjx-merror``, and no TeX left in the text outside code blocks (``\\(``, ``\\[``, ``$$``
  or a ``\\command``);
- every ``<img>`` loaded (``naturalWidth > 0``), and an operation page has at least one;
- no display equation and no code block is wider than the text column: a typeset equation
  wider than its box, or a code line that needs a horizontal scroll bar, fails (long
  equations are broken into lines in the page's source, long code lines in the code);
- no request left the local server (MathJax and fonts ship with the site);

and writes a full-page screenshot plus close-ups of the first display equation and the first
figure into ``--out``. Prints one JSON report; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import sys
import threading
from pathlib import Path

#: The pages the browser test of the build opens (tests/test_docs.py): they must show maths
#: and a figure.
KEY_PAGES = ("ops/batchtopk.html", "tutorials/train-numpy.html")
#: Generated pages, not written by hand: left out of the default list.
GENERATED = ("reference/api/", "reference/tests/", "_modules/", "_sources/", "jupyter_execute/")
SPECIAL = ("genindex.html", "search.html", "py-modindex.html")
#: A block may exceed its box by this many CSS pixels (sub-pixel rounding) before it counts.
SLACK_PX = 2
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Runs in the page once MathJax has finished: counts and the TeX left outside code.
_INSPECT = r"""
() => {
  const body = document.querySelector('article') || document.body;
  const clone = body.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .highlight, textarea')
       .forEach(e => e.remove());
  const text = clone.textContent;
  const tex = [];
  for (const re of [/\\\(/g, /\\\[/g, /\$\$/g, /\\[a-zA-Z]{2,}/g]) {
    for (const m of text.matchAll(re)) {
      tex.push(text.slice(Math.max(0, m.index - 30), m.index + 30).replace(/\s+/g, ' '));
    }
  }
  const imgs = Array.from(document.querySelectorAll('article img, main img'));
  // blocks wider than the text column: display maths (the typeset formula against its box and
  // the column) and code (its lines against its box: a horizontal scroll bar)
  const column = body.getBoundingClientRect();
  const wide = [];
  const snippet = e => (e.textContent || '').replace(/\s+/g, ' ').trim().slice(0, 80);
  for (const box of body.querySelectorAll('mjx-container[display="true"]')) {
    const math = box.querySelector('mjx-math') || box;
    const width = math.getBoundingClientRect().width;
    const room = Math.min(box.clientWidth || column.width, column.width);
    if (width > room + SLACK || box.scrollWidth > box.clientWidth + SLACK)
      wide.push({kind: 'equation', section: (box.closest('section') || {}).id || '',
                 width: Math.round(width), room: Math.round(room), text: snippet(box)});
  }
  for (const pre of body.querySelectorAll('pre')) {
    if (pre.scrollWidth > pre.clientWidth + SLACK) {
      const longest = (pre.textContent || '').split('\n').reduce((a, b) => b.length > a.length ? b : a, '');
      wide.push({kind: 'code', section: (pre.closest('section') || {}).id || '',
                 width: pre.scrollWidth, room: pre.clientWidth, text: longest.trim().slice(0, 80)});
    }
  }
  return {
    title: document.title,
    math_nodes: document.querySelectorAll('.math').length,
    mathjax_rendered: document.querySelectorAll('mjx-container').length,
    mathjax_errors: document.querySelectorAll('mjx-merror').length,
    raw_tex: tex.slice(0, 10),
    images: imgs.length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    column_width: Math.round(column.width),
    too_wide: wide,
  };
}
""".replace("SLACK", str(SLACK_PX))

_WAIT_MATHJAX = """
async () => {
  for (let i = 0; i < 200 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++)
    await new Promise(r => setTimeout(r, 50));
  if (!(window.MathJax && MathJax.startup)) return false;
  await MathJax.startup.promise;
  return true;
}
"""


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium executable: the argument, $SAE_REF_CHROMIUM, or the first on PATH."""
    for cand in (explicit, os.environ.get("SAE_REF_CHROMIUM")):
        if cand:
            return cand if Path(cand).exists() else shutil.which(cand)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path):
    """A thread serving ``directory`` on an ephemeral port of 127.0.0.1; returns (server, url)."""
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def check_page(browser, base: str, page_path: str, out: Path) -> dict:
    """Load one page, run the checks, take the screenshots; returns the page's report."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside = []
    page.on("request", lambda r: None if r.url.startswith((base, "data:", "blob:")) else outside.append(r.url))
    page.goto(base + page_path, wait_until="load")
    mathjax = page.evaluate(_WAIT_MATHJAX)
    page.wait_for_load_state("networkidle")
    report = page.evaluate(_INSPECT)
    stem = page_path.replace("/", "_").removesuffix(".html")
    shots = [out / f"{stem}.png"]
    page.screenshot(path=str(shots[0]), full_page=True)
    for selector, suffix in (("div.math", "equation"), ("div.cell_output img", "figure")):
        el = page.query_selector(selector)
        if el is not None:
            el.scroll_into_view_if_needed()
            path = out / f"{stem}-{suffix}.png"
            el.screenshot(path=str(path))
            shots.append(path)
    page.close()
    failures = []
    if report["math_nodes"] and not mathjax:
        failures.append("MathJax did not load")
    if report["mathjax_rendered"] < report["math_nodes"]:
        failures.append(f"{report['math_nodes'] - report['mathjax_rendered']} of "
                        f"{report['math_nodes']} maths nodes not typeset")
    if page_path in KEY_PAGES and report["mathjax_rendered"] == 0:
        failures.append("no maths rendered")
    if report["mathjax_errors"]:
        failures.append(f"{report['mathjax_errors']} MathJax errors")
    if report["raw_tex"]:
        failures.append(f"raw TeX in the text: {report['raw_tex']}")
    if report["images"] == 0 and (page_path in KEY_PAGES or page_path.startswith("ops/")) \
            and not page_path.endswith("index.html"):
        failures.append("no figure on the page")
    for block in report["too_wide"]:
        failures.append(f"{block['kind']} wider than the {block['room']} px column "
                        f"({block['width']} px) in #{block['section']}: {block['text']!r}")
    if report["broken_images"]:
        failures.append(f"images that did not load: {report['broken_images']}")
    if outside:
        failures.append(f"requests outside the site: {outside[:5]}")
    report.update(page=page_path, mathjax_loaded=mathjax, outside_requests=outside,
                  screenshots=[str(p) for p in shots], failures=failures)
    return report


def site_pages(html: Path) -> list[str]:
    """Every hand-written page of a built site, relative to ``html`` (the default PAGE list)."""
    pages = []
    for path in sorted(html.rglob("*.html")):
        rel = path.relative_to(html).as_posix()
        if rel.startswith(GENERATED) or rel in SPECIAL:
            continue
        pages.append(rel)
    return pages


def run(html: Path, out: Path, pages, chromium: str) -> list[dict]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    server, base = serve(html)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            try:
                return [check_page(browser, base, page, out) for page in pages]
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pages", nargs="*", help="pages relative to --html (default: every "
                    "hand-written page)")
    ap.add_argument("--html", type=Path, default=Path("docs/_build/html"))
    ap.add_argument("--out", type=Path, default=Path("docs/_build/screenshots"))
    ap.add_argument("--chromium", default=None)
    args = ap.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("no Chromium found: apt-get install chromium, or pass --chromium", file=sys.stderr)
        return 2
    args.pages = args.pages or site_pages(args.html)
    missing = [p for p in args.pages if not (args.html / p).is_file()]
    if not args.pages:
        missing = [str(args.html / "index.html")]
    if missing:
        print(f"not in {args.html}: {missing} (build the site first)", file=sys.stderr)
        return 2
    reports = run(args.html, args.out, args.pages, chromium)
    print(json.dumps(reports, indent=2))
    failed = [r for r in reports if r["failures"]]
    for r in failed:
        for f in r["failures"]:
            print(f"FAIL {r['page']}: {f}", file=sys.stderr)
    print(f"{len(reports) - len(failed)} of {len(reports)} pages pass", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
