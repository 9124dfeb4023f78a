"""Sphinx configuration of the sae-ref site.

Build (strict: any warning, or any error in an executed page, fails the build)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Everything is offline: the pages are MyST Markdown and MyST-NB notebooks executed at build
time, the API pages come from the docstrings (numpydoc), and MathJax is copied into the
site from the ``sphinx-mathjax-offline`` package instead of being loaded from a CDN.
``SAE_REF_DOCS_EXECUTE=cache`` reuses the outputs of unchanged pages between local builds.

Adding a page: write ``docs/ops/NAME.md`` (an operation) or ``docs/tutorials/NAME.md`` as a
MyST-NB notebook (the ``file_format: mystnb`` header of the existing pages) and add ``NAME`` to
the toctree of that folder's ``index.md``. A table of the property tests of an operation is
``sae-invariants`` with the test files and a ``:match:`` pattern (see ``_ext/saeref_docs.py``).
API pages need nothing: every public module gets one at build time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

# A global non-interactive matplotlib backend stops the executed pages from emitting their
# figures; the kernels inherit this process's environment, so drop it here.
os.environ.pop("MPLBACKEND", None)
# The executed pages use small arrays, for which BLAS threads only add synchronisation (on a
# busy 2-core machine a 128 x 32 product took 13 ms with two OpenBLAS threads, 0.07 ms with
# one). The kernels inherit these; set them in the environment to override.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

project = "sae-ref"
author = "the sae-ref authors"
copyright = "the sae-ref authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "numpydoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "saeref_docs",
]

exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints", "README.md"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# --- MyST and notebook execution ---------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# "force" executes every notebook page at every build (CI); SAE_REF_DOCS_EXECUTE=cache reuses
# unchanged pages' outputs between local builds.
nb_execution_mode = os.environ.get("SAE_REF_DOCS_EXECUTE", "force")
nb_execution_raise_on_error = False  # reported as a warning (an error under -W), every page run
nb_execution_show_tb = True
nb_execution_timeout = 300
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")
nb_merge_streams = True

# --- API pages ----------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_preserve_defaults = True  # signatures show ``xp=np`` as written, not the module's repr
autodoc_default_options = {"exclude-members": "__init__, __post_init__"}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# --- MathJax, shipped with the site (copied by _ext/saeref_docs.py) ----------------------------
mathjax_path = "mathjax/tex-chtml.js"

# --- HTML ---------------------------------------------------------------------------------------
html_theme = "furo"
html_title = "sae-ref"
html_static_path = ["_static"]
html_css_files = ["sae-ref.css"]
html_show_sourcelink = True
