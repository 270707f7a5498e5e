"""Sphinx configuration for the sc_vi_ext documentation.

Build with ``python -m sphinx -b html docs docs/_build/html``. Notebooks are rendered as
stored (``nb_execution_mode = "off"``): the build never trains a model, and needs no network.
"""

from __future__ import annotations

from datetime import date
from importlib.metadata import PackageNotFoundError, version

project = "sc_vi_ext"
author = "sc_vi_ext developers"
copyright = f"{date.today().year}, {author}"  # noqa: A001
try:
    release = version("sc_vi_ext")
except PackageNotFoundError:  # docs built without the package installed
    release = "0.0.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",  # Markdown (MyST) pages and .ipynb notebooks; loads myst_parser itself
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# .rst first: autosummary writes its stubs with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# -- API reference ---------------------------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": False}  # classes show their methods
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
# the docstrings are numpy style (see ruff's pydocstyle setting in pyproject.toml)
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True

# -- cross-references -------------------------------------------------------------------------
# Build with ``-n`` (nitpicky): every reference must resolve. Names outside this package resolve
# through these projects' inventories, which Sphinx downloads (the build needs the network).
nitpicky = True
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "scipy": ("https://docs.scipy.org/doc/scipy", None),
    "pandas": ("https://pandas.pydata.org/docs", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
    "matplotlib": ("https://matplotlib.org/stable", None),
}
# type hints name a class by where it is defined; the inventories list it where users import it
_QUALNAME_OVERRIDES = {
    "anndata._core.anndata.AnnData": "anndata.AnnData",
    "torch.nn.modules.module.Module": "torch.nn.Module",
    "matplotlib.axes._axes.Axes": "matplotlib.axes.Axes",
    "matplotlib.figure.Figure": "matplotlib.figure.Figure",
}


def _public_name(app, env, node, contnode):
    """Point a reference to a private module path at the public name, then let intersphinx resolve it."""
    target = node.get("reftarget")
    if target in _QUALNAME_OVERRIDES:
        node["reftarget"] = _QUALNAME_OVERRIDES[target]
    return None


def setup(app):
    app.connect("missing-reference", _public_name, priority=100)  # before intersphinx (500)


# -- MyST / notebooks ------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # never train models while building the docs
nb_merge_streams = True

# -- HTML ------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "sc_vi_ext"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
