"""Every public plot, by behaviour: what it returns, when it shows, and that it leaves the AnnData alone.

The signatures are checked in test_package.py; here each function of ``sv.pl.__all__`` is
called on one small AnnData that holds every result the plots draw.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import sc_vi_ext as sv

# extra arguments per plot: for a call without ``ax``, and for one with a single given ``ax``
CALLS = {
    "amortization_gap": ({"groupby": "cell_type"}, {}),
    "elbo": ({}, {}),
    "gap_history": ({}, {}),
    "latent": ({"color": "cell_type"}, {"color": "cell_type"}),
    "posterior_predictive": ({}, {"stats": "mean"}),
    "reference_coverage": ({"groupby": "cell_type"}, {"groupby": "cell_type"}),
}
PL = [getattr(sv.pl, name) for name in sv.pl.__all__]


def test_every_plot_has_a_call():
    assert set(CALLS) == set(sv.pl.__all__)


@pytest.fixture(scope="module")
def diagnosed():
    """A small trained AnnData with every result the plots draw (never mutate it)."""
    adata = sv.datasets.simulate(120, 30, n_batches=1, n_types=3, n_markers=5, random_state=3)
    sv.tl.vae(adata, n_hidden=16, max_epochs=6, gap_every=3, progress=False)
    sv.tl.amortization_gap(adata, n_cells=40, max_steps=20, n_samples=30, progress=False)
    sv.tl.posterior_predictive(adata, n_samples=3, progress=False)
    sv.tl.reference_coverage(adata, reference=adata, n_scale_cells=50, max_steps=5, progress=False)
    sc.pp.neighbors(adata, use_rep="X_vae")
    sc.tl.umap(adata)
    # pl.latent draws with sc.pl.embedding, which (as every scanpy plot) turns string columns of
    # obs and var into categoricals and stores a palette for a category without one: done beforehand
    adata.strings_to_categoricals()
    adata.uns["cell_type_colors"] = np.array(["#1f77b4", "#ff7f0e", "#2ca02c"], dtype=object)
    return adata


def _assert_same(a, b, where: str) -> None:
    """Recursive equality of AnnData contents (dicts, arrays, frames, sparse matrices, scalars)."""
    if isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict), where
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)} added or removed"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, obj=where)
    elif sp.issparse(a):
        assert sp.issparse(b) and a.shape == b.shape and (a != b).nnz == 0, where
    elif a is None or b is None:
        assert a is b, where
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


def _assert_adata_unchanged(adata, before) -> None:
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    _assert_same(adata.X, before.X, "X")
    for name in ("obsm", "varm", "obsp", "layers"):
        _assert_same(dict(getattr(adata, name)), dict(getattr(before, name)), name)
    _assert_same(adata.uns, before.uns, "uns")


def _title(ax) -> str:
    return ax.get_title() + ax.get_title(loc="left")


def _as_list(out) -> list:
    return out if isinstance(out, list) else [out]


@pytest.mark.parametrize("func", PL, ids=lambda f: f"pl.{f.__name__}")
def test_returns_axes_or_figure_and_leaves_adata_alone(func, diagnosed):
    adata = diagnosed.copy()
    before = adata.copy()
    kw, ax_kw = CALLS[func.__name__]
    out = func(adata, show=False, **kw)
    axes = _as_list(out)
    assert axes and all(isinstance(a, Axes) for a in axes)
    fig = axes[0].figure
    assert all(a.figure is fig and a in fig.axes for a in axes)  # the Axes of one drawn figure
    assert all(a.has_data() for a in axes)
    fig = func(adata, return_fig=True, **kw)
    assert isinstance(fig, Figure)
    # the same panels as without return_fig (twin axes and colorbars carry no title)
    assert [_title(a) for a in fig.axes if _title(a)] == [_title(a) for a in axes]
    assert all(_title(a) for a in axes)
    _, ax = plt.subplots()
    assert func(adata, ax=ax, show=False, **ax_kw) is ax
    assert ax.has_data()
    _assert_adata_unchanged(adata, before)


@pytest.mark.parametrize("func", PL, ids=lambda f: f"pl.{f.__name__}")
def test_show_default(func, diagnosed, monkeypatch):
    """``show=None`` shows a new figure (and returns None, as scanpy does), but returns a given ``ax``.

    ``return_fig`` returns the Figure without showing it; ``show=True`` shows even into a given ``ax``.
    """
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    adata = diagnosed.copy()
    kw, ax_kw = CALLS[func.__name__]
    assert func(adata, **kw) is None
    assert len(shown) == 1
    _, ax = plt.subplots()
    assert func(adata, ax=ax, **ax_kw) is ax
    assert len(shown) == 1
    assert func(adata, ax=ax, show=True, **ax_kw) is None
    assert len(shown) == 2
    assert isinstance(func(adata, return_fig=True, **kw), Figure)
    assert all(isinstance(a, Axes) for a in _as_list(func(adata, show=False, **kw)))
    assert len(shown) == 2
