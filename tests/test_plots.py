"""``sv.pl.elbo`` and ``sv.pl.latent``: return values, the ``ax``/``show``/``return_fig`` convention, errors."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import sc_vi_ext as sv

PANELS = [("elbo", "ELBO (nats/cell)"), ("reconstruction", "E_q log p(x|z)"), ("kl", "KL(q || p)")]


def _assert_draws_history(ax, uns, name):
    """The panel ``name`` draws the recorded train and validation curves over every epoch and the best epoch."""
    h = uns["history"]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for split in ("train", "validation"):
        np.testing.assert_array_equal(lines[split].get_xdata(), h["epoch"])
        np.testing.assert_array_equal(lines[split].get_ydata(), h[f"{name}_{split}"])
    np.testing.assert_array_equal(lines["best epoch"].get_xdata(), [uns["best_epoch"]] * 2)


def test_elbo_returns_three_axes(trained_session):
    uns = trained_session.uns["vae"]
    axes = sv.pl.elbo(trained_session, show=False)
    assert isinstance(axes, list) and len(axes) == 3
    assert all(isinstance(a, Axes) for a in axes)
    assert [a.get_title() for a in axes] == [label for _, label in PANELS]
    for ax, (name, _) in zip(axes, PANELS, strict=True):
        _assert_draws_history(ax, uns, name)
    # the KL panel's twin axis draws the warm-up weight per epoch
    (twin,) = [a for a in axes[2].figure.axes if a not in axes]
    np.testing.assert_array_equal(twin.get_lines()[0].get_ydata(), uns["history"]["kl_weight"])


def test_elbo_into_given_ax(trained_session):
    fig, ax = plt.subplots()
    out = sv.pl.elbo(trained_session, ax=ax, show=False)
    assert out is ax
    assert len(fig.axes) == 1
    assert ax.get_title() == "ELBO (nats/cell)"  # only the ELBO panel, into the given ax
    _assert_draws_history(ax, trained_session.uns["vae"], "elbo")


def test_elbo_return_fig(trained_session):
    fig = sv.pl.elbo(trained_session, return_fig=True)
    assert isinstance(fig, Figure)
    assert [a.get_title() for a in fig.axes if a.get_title()] == [label for _, label in PANELS]


def test_elbo_without_validation(sim, fast):
    sv.tl.vae(sim, train_size=1.0, **fast)
    axes = sv.pl.elbo(sim, show=False)
    labels = [ln.get_label() for ln in axes[0].get_lines()]
    assert "train" in labels and "validation" not in labels


def test_elbo_missing_key(trained_session):
    with pytest.raises(KeyError, match="other"):
        sv.pl.elbo(trained_session, key="other", show=False)


def test_latent_computes_umap_when_missing(trained):
    assert "X_umap" not in trained.obsm and "neighbors" not in trained.uns
    ax = sv.pl.latent(trained, color="cell_type", show=False)
    assert isinstance(ax, Axes)
    assert ax.get_title() == "cell_type"
    assert trained.obsm["X_umap"].shape == (trained.n_obs, 2)
    assert trained.uns["neighbors"]["params"]["use_rep"] == "X_vae"
    # the drawn points are the UMAP coordinates, one per cell (scanpy may draw them in another order)
    offsets = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    assert len(offsets) == trained.n_obs
    umap = trained.obsm["X_umap"]
    np.testing.assert_allclose(offsets[np.lexsort(offsets.T)], umap[np.lexsort(umap.T)], rtol=1e-6)


def test_latent_reuses_existing_umap(trained):
    sv.pl.latent(trained, show=False)
    umap = trained.obsm["X_umap"].copy()
    plt.close("all")
    sv.pl.latent(trained, color="batch", show=False)
    np.testing.assert_array_equal(trained.obsm["X_umap"], umap)


def test_latent_ax_and_return_fig(trained):
    fig, ax = plt.subplots()
    assert sv.pl.latent(trained, color="cell_type", ax=ax, show=False) is ax
    fig = sv.pl.latent(trained, color=["cell_type", "batch"], return_fig=True)
    assert isinstance(fig, Figure)
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["cell_type", "batch"]
    axes = sv.pl.latent(trained, color=["cell_type", "batch"], show=False)
    assert isinstance(axes, list) and [a.get_title() for a in axes] == ["cell_type", "batch"]


def test_latent_missing_key(trained):
    with pytest.raises(KeyError, match="X_other"):
        sv.pl.latent(trained, key="other", show=False)
    assert "X_umap" not in trained.obsm  # nothing computed before the error
