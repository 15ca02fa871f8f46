"""Sphinx configuration for the trio_uring documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``; run the code
blocks with ``sphinx-build -W -b doctest docs docs/_build/doctest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import trio_uring  # noqa: E402

project = "trio_uring"
author = "the trio_uring authors"
copyright = "the trio_uring authors"
release = trio_uring.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.graphviz",
    "sphinxcontrib_trio",
]

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path = ["_static"] if (HERE / "_static").is_dir() else []
html_theme = "alabaster"
html_theme_options = {
    "description": "trio streams over io_uring, zero-copy sends from registered memory",
    "fixed_sidebar": True,
}
primary_domain = "py"
pygments_style = "default"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

graphviz_output_format = "svg"

# Every doctest and testcode block starts with these names imported.
doctest_global_setup = """
import trio
import trio_uring
"""
doctest_test_doctest_blocks = ""
