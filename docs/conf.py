"""Sphinx configuration for tlsmitm's documentation."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "tlsmitm"
author = "the tlsmitm developers"
copyright = "2026, the tlsmitm developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
autodoc_typehints = "description"
autodoc_member_order = "bysource"
nitpicky = False
html_theme = "furo"
html_title = "tlsmitm"
exclude_patterns = ["_build"]
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
suppress_warnings = ["ref.python"]
