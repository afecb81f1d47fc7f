"""Sphinx configuration: the muonclip_jax API docs and notebooks.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "muonclip_jax"
author = "muonclip_jax authors"
copyright = "2026, muonclip_jax authors"  # noqa: A001

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "myst_nb",
]

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Notebooks are rendered as committed (with their outputs), never executed here.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# No network at build time: references to other projects stay plain text.
intersphinx_mapping: dict = {}
nitpicky = False
# The notebooks use H3 under H1 for their step headings; that is not a docstring problem.
suppress_warnings = ["myst.header"]

html_theme = "sphinx_book_theme"
html_title = "muonclip_jax"
html_theme_options = {"show_toc_level": 2}
