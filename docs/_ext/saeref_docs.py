"""Sphinx helpers of the sae-ref site, generated from the code at every build.

- ``sae-invariants``: a table of the property tests that check an operation, read from
  ``tests/`` with :mod:`ast` (test name, the first paragraph of its docstring, a link to its
  source). A pattern that matches no test, a named test that does not exist, or a listed
  test without a docstring is a build error, so a page cannot go on citing a test that was
  renamed or deleted, nor show a row that does not say what its test checks.
- ``sae-test-sources``: every test of one test file with its docstring and source, each with
  an anchor the tables above link to.
- Class docstrings that list their fields as ``name : text`` lines without a section header
  (the project's dataclass style) get a numpydoc ``Attributes`` header, so the list renders
  as one instead of as run-on paragraphs.
- The "[docs]" links of the source pages (``sphinx.ext.viewcode``) lead to the object on
  its module's API page. viewcode keeps one anchor prefix per module, the module name under
  which the first object of it was documented; an object re-exported by a package
  (``sae_ref.resolve``, defined in ``sae_ref.arrays``) is documented twice, and the prefix
  of one page was then paired with the other page, so the link landed at the top of a page
  without that anchor. Every link is pointed at ``<module>.<name>`` on the page that
  documents it, and a link whose anchor is still missing from its page is a build warning.
- One API page per public module and one page per test file, written into
  ``reference/api/`` and ``reference/tests/`` when the build starts (both git-ignored), so a
  new module or test file appears without editing any page.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
#: Where the generated pages go, relative to the source directory.
API_DIR = Path("reference") / "api"
TEST_PAGES_DIR = Path("reference") / "tests"
#: Packages whose modules get an API page; private modules (a leading underscore) are left out.
PACKAGES = ("sae_ref", "sae_ref.backends", "sae_ref.validation")
OBJTYPE = "testfunc"


@dataclass(frozen=True)
class TestFunction:
    file: str  # relative to the repository root, e.g. "tests/test_activations.py"
    name: str  # "test_..." or "TestClass.test_..."
    lineno: int
    doc: str
    source: str

    @property
    def key(self) -> str:
        return f"{self.file}::{self.name}"

    @property
    def anchor(self) -> str:
        return nodes.make_id(f"test-{Path(self.file).stem}-{self.name}")


_CACHE: dict[Path, tuple[float, list[TestFunction]]] = {}


def read_tests(path: Path, root: Path = ROOT) -> list[TestFunction]:
    """The test functions of one file (top-level ``test_*`` and ``Test*`` class methods);
    their ``file`` is the path relative to ``root``."""
    mtime = path.stat().st_mtime
    if path in _CACHE and _CACHE[path][0] == mtime:
        return _CACHE[path][1]
    text = path.read_text()
    tree = ast.parse(text)
    rel = path.relative_to(root).as_posix()
    found = []

    def add(fn, prefix=""):
        src = ast.get_source_segment(text, fn, padded=True) or ""
        start = min([d.lineno for d in fn.decorator_list] + [fn.lineno])
        if fn.decorator_list:  # include the decorators (hypothesis settings and strategies)
            src = "\n".join(text.splitlines()[start - 1:fn.end_lineno])
        found.append(TestFunction(rel, prefix + fn.name, start, ast.get_docstring(fn) or "",
                                  _dedent(src)))

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            add(node)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name.startswith("test_"):
                    add(sub, node.name + ".")
    _CACHE[path] = (mtime, found)
    return found


def _dedent(src: str) -> str:
    lines = src.splitlines()
    indent = min((len(s) - len(s.lstrip()) for s in lines if s.strip()), default=0)
    return "\n".join(s[indent:] for s in lines)


def first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _tests_dir(directive: SphinxDirective) -> Path:
    """The tests folder (``saeref_tests_dir``; the repository's ``tests/`` by default)."""
    return Path(directive.config.saeref_tests_dir or TESTS).resolve()


def _test_file(directive: SphinxDirective, arg: str) -> Path:
    """``arg`` (``tests/test_NAME.py``, relative to the folder above the tests folder)."""
    tests = _tests_dir(directive)
    path = (tests.parent / arg).resolve()
    if not path.is_file() or path.parent != tests:
        raise directive.error(f"{directive.name}: {arg!r} is not a file in {tests.name}/")
    return path


class InvariantsDirective(SphinxDirective):
    """A table of the tests of one or more test files whose names match ``:match:``
    (a regular expression, searched) or are listed in ``:names:``. Every listed test must
    have a docstring: its first paragraph is the row's statement of the invariant."""

    required_arguments = 1
    optional_arguments = 8
    option_spec: ClassVar[dict] = {"match": directives.unchanged, "names": directives.unchanged}

    def run(self):
        pattern = self.options.get("match")
        names = [n.strip() for n in self.options.get("names", "").replace(",", " ").split() if n.strip()]
        if not pattern and not names:
            raise self.error(f"{self.name}: give :match: or :names:")
        tests = []
        for arg in self.arguments:
            path = _test_file(self, arg)
            self.env.note_dependency(str(path))
            tests.extend(read_tests(path, _tests_dir(self).parent))
        chosen = [t for t in tests if (pattern and re.search(pattern, t.name)) or t.name in names]
        missing = [n for n in names if n not in {t.name for t in tests}]
        if missing:
            raise self.error(f"{self.name}: no test named {missing} in {self.arguments}")
        if not chosen:
            raise self.error(f"{self.name}: no test in {self.arguments} matches {pattern!r}")
        bare = [t.key for t in chosen if not first_paragraph(t.doc)]
        if bare:
            raise self.error(f"{self.name}: tests without a docstring: {bare}; the table shows "
                             f"each test's docstring, which states the invariant it checks")
        return [self._table(chosen)]

    def _table(self, tests):
        table = nodes.table(classes=["sae-invariants", "colwidths-given"])
        group = nodes.tgroup(cols=2)
        table += group
        for width in (45, 55):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += _row([nodes.paragraph(text="test (the invariant is its name)"),
                      nodes.paragraph(text="what it checks (its docstring)")])
        body = nodes.tbody()
        group += body
        for t in tests:
            ref = addnodes.pending_xref("", refdomain="std", reftype=OBJTYPE, reftarget=t.key,
                                        refexplicit=True, refwarn=True)
            ref += nodes.literal(text=t.name)
            para = nodes.paragraph()
            para += ref
            para += nodes.inline(text=f"  ({Path(t.file).name})", classes=["sae-test-file"])
            body += _row([para, nodes.paragraph(text=first_paragraph(t.doc))])
        return table


def _row(cells):
    row = nodes.row()
    for c in cells:
        entry = nodes.entry()
        entry += c
        row += entry
    return row


class TestSourcesDirective(SphinxDirective):
    """Every test of one test file: an anchor, its name, its docstring, its source."""

    required_arguments = 1

    def run(self):
        path = _test_file(self, self.arguments[0])
        self.env.note_dependency(str(path))
        std = self.env.domains.standard_domain
        out = []
        for t in read_tests(path, _tests_dir(self).parent):
            box = nodes.container(classes=["sae-test"], ids=[t.anchor])
            title = nodes.paragraph(classes=["sae-test-name"])
            title += nodes.strong(text=t.name)
            title += nodes.inline(text=f"  ({t.file}, line {t.lineno})", classes=["sae-test-file"])
            box += title
            if t.doc:
                box += nodes.paragraph(text=first_paragraph(t.doc))
            code = nodes.literal_block(t.source, t.source, language="python")
            box += code
            std.note_object(OBJTYPE, t.key, t.anchor, location=(self.env.docname, self.lineno))
            out.append(box)
        return out


def public_modules() -> list[str]:
    """Every importable module of :data:`PACKAGES` whose name has no private part."""
    names = set(PACKAGES)
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.update(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))
    return sorted(n for n in names if not any(p.startswith("_") for p in n.split(".")))


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _sync_dir(directory: Path, pages: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.md"):
        if old.name not in pages:
            old.unlink()
    for name, text in pages.items():
        _write_if_changed(directory / name, text)


def generate_pages(app) -> None:
    """Write the API pages and the test-file pages (only files whose text changed)."""
    if not app.config.saeref_generate_pages:
        return
    src = Path(app.srcdir)
    api = {}
    for mod in public_modules():
        api[f"{mod}.md"] = (f"# `{mod}`\n\n```{{eval-rst}}\n.. automodule:: {mod}\n"
                            f"   :members:\n   :show-inheritance:\n```\n")
    _sync_dir(src / API_DIR, api)
    tests = {}
    for path in sorted(TESTS.glob("test_*.py")):
        rel = path.relative_to(ROOT).as_posix()
        tests[f"{path.stem}.md"] = (f"# `{rel}`\n\n```{{sae-test-sources}} {rel}\n```\n")
    _sync_dir(src / TEST_PAGES_DIR, tests)


_FIELD = re.compile(r"^[A-Za-z_][\w.]*(\s*,\s*[A-Za-z_][\w.]*)* : \S")


def field_list_as_attributes(app, what, name, obj, options, lines):
    """Insert ``Attributes`` before an unheaded ``name : text`` field list of a class."""
    if what != "class":
        return
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and lines[i + 1].strip() and set(lines[i + 1].strip()) == {"-"}:
            return  # a numpydoc section comes first: leave the docstring to numpydoc
        if _FIELD.match(line) and (i == 0 or not lines[i - 1].strip()):
            lines[i:i] = ["Attributes", "----------"]
            return


def _offline_mathjax(app) -> None:
    """Copy MathJax into the site at the end of the build (``mathjax_path`` in conf.py points
    at it), from the ``sphinx-mathjax-offline`` package, so no page loads it from a CDN."""
    try:
        package = importlib.import_module("sphinx-mathjax-offline")
    except ImportError:
        from sphinx.errors import ExtensionError

        raise ExtensionError("the docs ship MathJax from the package sphinx-mathjax-offline: "
                             "pip install sphinx-mathjax-offline (the docs extra)") from None
    app.connect("build-finished", package.copy_mathjax_files)


def _viewcode_backlinks(app):
    """Before viewcode writes the source pages: each "[docs]" link of module ``M`` goes to
    ``M.name`` on the page that documents it (see the module docstring)."""
    modules = getattr(app.env, "_viewcode_modules", {})
    objects = app.env.get_domain("py").objects
    for modname, entry in list(modules.items()):
        if not entry:
            continue
        code, tags, used, _refname = entry
        for name in list(used):
            obj = objects.get(f"{modname}.{name}")
            if obj is None or obj.node_id != f"{modname}.{name}":
                del used[name]  # documented only under another name: no link beats a wrong one
            else:
                used[name] = obj.docname
        modules[modname] = (code, tags, used, modname)
        # viewcode keeps a source page newer than its module; an old build's page may hold
        # the old links, so it is written again
        old = Path(app.outdir) / "_modules" / (modname.replace(".", "/") + ".html")
        old.unlink(missing_ok=True)
    return []


_BACKLINK = re.compile(r'<a class="viewcode-back" href="([^"#]*)#([^"]*)"')


def _check_viewcode_backlinks(app, exception) -> None:
    """Warn for every "[docs]" link whose anchor its target page does not have."""
    if exception is not None or app.builder.format != "html":
        return
    from sphinx.util import logging

    out = Path(app.outdir)
    ids: dict[Path, str] = {}
    for page in sorted((out / "_modules").rglob("*.html")):
        for href, anchor in _BACKLINK.findall(page.read_text(encoding="utf-8")):
            target = (page.parent / href).resolve()
            if target not in ids:
                ids[target] = target.read_text(encoding="utf-8") if target.is_file() else ""
            if f'id="{anchor}"' not in ids[target]:
                logging.getLogger(__name__).warning(
                    "%s: the [docs] link to %s#%s finds no such anchor",
                    page.relative_to(out).as_posix(), href, anchor)


def setup(app):
    _offline_mathjax(app)
    app.add_config_value("saeref_generate_pages", True, "env")
    # the folder the test tables read (None: the repository's tests/); the build's own tests
    # point it at a folder of their own
    app.add_config_value("saeref_tests_dir", None, "env")
    app.add_object_type(OBJTYPE, OBJTYPE, objname="property test")
    app.add_directive("sae-invariants", InvariantsDirective)
    app.add_directive("sae-test-sources", TestSourcesDirective)
    app.connect("builder-inited", generate_pages)
    # before viewcode's own html-collect-pages handler (priority 500) writes the source pages
    app.connect("html-collect-pages", _viewcode_backlinks, priority=400)
    app.connect("build-finished", _check_viewcode_backlinks)
    # before numpydoc (priority 500) turns sections into reST
    app.connect("autodoc-process-docstring", field_list_as_attributes, priority=400)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
