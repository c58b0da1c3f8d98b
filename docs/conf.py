"""Sphinx configuration for the excitation documentation (offline: no intersphinx, no downloads).

Build:  pip install -e ".[docs]" && sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package from this checkout
sys.path.insert(0, str(HERE / "_ext"))
os.environ.setdefault("EXCITATION_NATIVE", "0")  # importing the package never builds the C kernels here

import excitation  # noqa: E402

project = "excitation"
author = "the excitation authors"
copyright = "2026, the excitation authors"
release = excitation.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_copybutton",
    "excitation_docs",  # docs/_ext: the generated pages (rules, runtimes, CLI, API list)
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"

# Data files live beside the pages (benchmark tables, evidence runs, JSON, figures): only pages are built.
exclude_patterns = [
    "_build",
    "bench/**",
    "evidence/**",
    "**.json",
    "**/*.txt",
    "_api_autosummary.rst",  # included by api.md
]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autosummary_generate = ["_api_autosummary.rst"]  # written by docs/_ext/excitation_docs.py
autosummary_imported_members = True
autodoc_default_options = {"members": False, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

# Offline build: nothing is fetched.
intersphinx_mapping: dict = {}
nitpicky = False

html_theme = "furo"
html_title = f"excitation {release}"
html_static_path: list = []
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

suppress_warnings = ["myst.header"]
