"""Offline text corpora: text already on the machine, in a deterministic order.

:func:`stdlib_corpus` needs nothing but the Python installation: the help topics of
``pydoc_data.topics`` (79 documents, about 0.13M tokens with a BERT word-piece tokenizer, built
instantly) and the module, class and function docstrings of the standard library's source
files (a few seconds to parse, cached after the first call). :func:`text_files_corpus` reads
the user's own files. Both return a list of strings, one per document, in an order fixed by
sorted traversal, so two calls on the same machine give the identical corpus (its hash is
recorded by :func:`sae_ref.data.harvest.harvest`). The docstrings depend on the Python version.

>>> from sae_ref.data.corpus import stdlib_corpus
>>> docs = stdlib_corpus(docstrings=False)
>>> len(docs) > 50, docs == stdlib_corpus(docstrings=False), all(d.strip() for d in docs)
(True, True, True)
>>> len(stdlib_corpus(docstrings=False, max_docs=3))
3
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import inspect
import os
import sysconfig
import warnings

from sae_ref.data.stream import check_int

#: Directories of the standard library whose docstrings are left out (tests, the IDLE GUI,
#: the removed 2to3 tool, installed third-party packages).
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                       "__pycache__"})
#: Docstrings shorter than this (after cleaning) are left out ("Return self.", ...).
MIN_DOCSTRING_CHARS = 40

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_corpus(*, topics: bool = True, docstrings: bool = True,
                  max_docs: int | None = None) -> list[str]:
    """Documents from the Python installation: help topics, then standard-library docstrings.

    Parameters
    ----------
    topics : bool
        Include the values of ``pydoc_data.topics.topics`` (the text of ``help("if")`` and the
        like), sorted by topic name.
    docstrings : bool
        Include the module, class and function docstrings of ``Lib/**/*.py`` under
        ``sysconfig.get_paths()["stdlib"]``, parsed with :mod:`ast` (no module is imported).
        Directories in :data:`SKIP_DIRS` are skipped; files and directories are visited in
        sorted order, each docstring is cleaned with :func:`inspect.cleandoc`, duplicates
        keep their first occurrence, and docstrings shorter than :data:`MIN_DOCSTRING_CHARS`
        characters are dropped.
    max_docs : int, optional
        Keep only the first ``max_docs`` documents.

    Returns
    -------
    list of str
        One document per topic or docstring; a new list on every call.

    Raises
    ------
    ValueError
        Both sources are switched off or yield nothing (``max_docs`` must be >= 1).
    """
    op = "stdlib_corpus"
    if max_docs is not None:
        max_docs = check_int(op, "max_docs", max_docs, 1)
    docs: list[str] = []
    if topics:
        docs.extend(_topics())
    if docstrings:
        docs.extend(_stdlib_docstrings(sysconfig.get_paths()["stdlib"]))
    if not docs:
        raise ValueError(f"{op}: the corpus is empty (arguments topics={topics!r}, "
                         f"docstrings={docstrings!r}); switch on at least one source")
    return docs[:max_docs] if max_docs is not None else docs


def _topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down Python without pydoc_data
        return []
    return [text.strip() for _, text in sorted(topics.items()) if text.strip()]


@functools.lru_cache(maxsize=4)
def _stdlib_docstrings(root: str) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for path in _walk_py(root):
        for doc in _file_docstrings(path):
            if len(doc) >= MIN_DOCSTRING_CHARS and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return tuple(out)


def _walk_py(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _file_docstrings(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old files
            tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    docs = []
    # ast.walk is breadth-first in a fixed order: module, then classes and functions
    for node in ast.walk(tree):
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                doc = inspect.cleandoc(doc).strip()
                if doc:
                    docs.append(doc)
    return docs


def text_files_corpus(paths, *, paragraphs: bool = False, pattern: str = "*.txt",
                      encoding: str = "utf-8") -> list[str]:
    """Documents from the user's text files: one per file, or one per paragraph.

    Parameters
    ----------
    paths : str, path, or iterable of them
        Files, and directories searched recursively (in sorted order) for files whose name
        matches ``pattern``. Files named explicitly are read whatever their name.
    paragraphs : bool
        Split each file at blank lines into one document per paragraph (lines within a
        paragraph keep their line breaks).
    pattern : str
        :func:`fnmatch.fnmatch` pattern for the files found in directories.
    encoding : str
        Encoding of every file; a file that does not decode raises ValueError naming it.

    Returns
    -------
    list of str
        Documents in the order given (directories expanded in sorted order); documents that
        are empty or whitespace only are skipped.

    Raises
    ------
    FileNotFoundError
        A path does not exist.
    ValueError
        No document (no files, or only empty ones), or a file does not decode.
    """
    op = "text_files_corpus"
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    try:
        paths = [os.fspath(p) for p in paths]
    except TypeError:
        raise TypeError(f"{op}: argument 'paths' must be a path or an iterable of paths, "
                        f"got {paths!r}") from None
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                files.extend(os.path.join(dirpath, n) for n in sorted(filenames)
                             if fnmatch.fnmatch(n, pattern))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{op}: argument 'paths': '{p}' does not exist")
    docs: list[str] = []
    for path in files:
        try:
            with open(path, encoding=encoding) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{op}: file '{path}' is not valid {encoding} ({e})") from None
        if paragraphs:
            docs.extend(_paragraphs(text))
        elif text.strip():
            docs.append(text.strip())
    if not docs:
        raise ValueError(f"{op}: the corpus is empty: {len(files)} file(s) found under "
                         f"{paths!r} (pattern {pattern!r} for directories) hold no text")
    return docs


def _paragraphs(text: str) -> list[str]:
    out, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            out.append("\n".join(current).strip())
            current = []
    if current:
        out.append("\n".join(current).strip())
    return [p for p in out if p]
