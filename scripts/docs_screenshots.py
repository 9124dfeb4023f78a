"""Open the built docs in headless Chromium, check that maths and figures render, screenshot.

Usage (after building the site into docs/_build/html)::

    python scripts/docs_screenshots.py [--html docs/_build/html] [--out docs/_build/screenshots]
                                       [--chromium /usr/bin/chromium] [PAGE ...]

PAGE defaults to the BatchTopK page and the first tutorial. The site is served from a local
HTTP server on 127.0.0.1; the browser is the system's Chromium driven by playwright
(``pip install playwright``; ``apt-get install chromium``; playwright's own browser download
is not needed). Per page it checks:

- MathJax typeset every maths node: at least one ``mjx-container``, no ``mjx-merror``, and
  no TeX left in the text outside code blocks (``\\(``, ``\\[``, ``$$`` or a ``\\command``);
- every ``<img>`` loaded (``naturalWidth > 0``) and the page has at least one;
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

DEFAULT_PAGES = ("ops/batchtopk.html", "tutorials/train-numpy.html")
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
  return {
    title: document.title,
    math_nodes: document.querySelectorAll('.math').length,
    mathjax_rendered: document.querySelectorAll('mjx-container').length,
    mathjax_errors: document.querySelectorAll('mjx-merror').length,
    raw_tex: tex.slice(0, 10),
    images: imgs.length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
  };
}
"""

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
    if not mathjax:
        failures.append("MathJax did not load")
    if report["mathjax_rendered"] == 0:
        failures.append("no maths rendered")
    if report["mathjax_errors"]:
        failures.append(f"{report['mathjax_errors']} MathJax errors")
    if report["raw_tex"]:
        failures.append(f"raw TeX in the text: {report['raw_tex']}")
    if report["images"] == 0:
        failures.append("no figure on the page")
    if report["broken_images"]:
        failures.append(f"images that did not load: {report['broken_images']}")
    if outside:
        failures.append(f"requests outside the site: {outside[:5]}")
    report.update(page=page_path, mathjax_loaded=mathjax, outside_requests=outside,
                  screenshots=[str(p) for p in shots], failures=failures)
    return report


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
    ap.add_argument("pages", nargs="*", default=list(DEFAULT_PAGES))
    ap.add_argument("--html", type=Path, default=Path("docs/_build/html"))
    ap.add_argument("--out", type=Path, default=Path("docs/_build/screenshots"))
    ap.add_argument("--chromium", default=None)
    args = ap.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("no Chromium found: apt-get install chromium, or pass --chromium", file=sys.stderr)
        return 2
    missing = [p for p in args.pages if not (args.html / p).is_file()]
    if missing:
        print(f"not in {args.html}: {missing} (build the site first)", file=sys.stderr)
        return 2
    reports = run(args.html, args.out, args.pages, chromium)
    print(json.dumps(reports, indent=2))
    return 1 if any(r["failures"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
