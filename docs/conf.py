"""Sphinx configuration of the onegov.chat documentation."""

project = 'onegov.chat'
author = 'the onegov.chat developers'
copyright = '2026, the onegov.chat developers'  # noqa: A001

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]

source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
root_doc = 'index'
exclude_patterns = ['_build']

myst_heading_anchors = 3
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = 'alabaster'
html_title = 'onegov.chat'
