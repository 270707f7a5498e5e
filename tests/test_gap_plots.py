"""The gap figure reads only what the tools wrote; progress bars end on the result line."""

from __future__ import annotations

import importlib.util

import matplotlib.pyplot as plt
import numpy as np
import pytest

import sc_vi_ext as sv

FAST = {"max_steps": 30, "n_samples": 60, "progress": False}


@pytest.fixture(scope="module")
def gapped():
    adata = sv.datasets.simulate(150, 40, n_batches=1, n_types=3, n_markers=5, random_state=7)
    sv.tl.vae(adata, n_hidden=32, max_epochs=20, train_size=0.8, progress=False)
    sv.tl.amortization_gap(adata, n_cells=None, **FAST)
    return adata


def test_figure_needs_no_counts(gapped):
    """Every panel comes from obs/uns: the figure draws with the count matrix gone."""
    a = gapped.copy()
    a.X = None
    axes = sv.pl.amortization_gap(a, groupby="cell_type", show=False)
    assert len(axes) == 4
    titles = [ax.get_title(loc="left") for ax in axes]
    assert all(titles), titles  # one message per panel
    for ax in axes:  # units on every axis that carries a gap
        assert "nats" in ax.get_xlabel() + ax.get_ylabel()
    labels = [t.get_text() for t in axes[3].get_yticklabels()]
    assert all("n=" in t for t in labels)  # n on every group
    legend = "".join(t.get_text() for t in axes[0].get_legend().get_texts())
    assert "training cells (n=" in legend and "held-out cells (n=" in legend
    assert "s.e." in axes[0].get_xlabel()  # the error bars are explained
    plt.close("all")


def test_small_groups_are_marked(gapped):
    a = gapped.copy()
    a.obs["grp"] = np.where(np.arange(a.n_obs) < 5, "rare", "common")
    axes = sv.pl.amortization_gap(a, groupby="grp", show=False)
    labels = {t.get_text().split()[0]: t.get_text() for t in axes[3].get_yticklabels()}
    assert "(small group)" in labels["rare"] and "(small group)" not in labels["common"]
    plt.close("all")


def test_negative_gaps_in_plain_words(gapped):
    a = gapped.copy()
    axes = sv.pl.amortization_gap(a, show=False)
    note = axes[1].get_legend().get_title().get_text()
    assert "no cell's gap is below zero" in note
    a.obs.loc[a.obs_names[0], "vae_amortization_gap"] = -50.0
    axes = sv.pl.amortization_gap(a, show=False)
    assert "1 cell(s) below zero" in axes[1].get_legend().get_title().get_text()
    plt.close("all")


def test_progress_bar_ends_with_the_result(gapped, capsys):
    sv.tl.amortization_gap(gapped, n_cells=40, copy=True, **{**FAST, "progress": True})
    err = capsys.readouterr().err
    assert "amortization gap, nats/cell: training" in err and "held-out" in err


def test_no_widget_bar_without_ipywidgets():
    from sc_vi_ext._progress import tqdm

    if importlib.util.find_spec("ipywidgets") is None:
        from tqdm.std import tqdm as std

        assert tqdm is std  # tqdm.auto would warn "IProgress not found" in a notebook
