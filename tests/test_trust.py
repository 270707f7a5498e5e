"""Trust score and overfitting alarm, on a model whose encoder is known to overfit.

240 simulated cells, half held out, 200 epochs of minibatches of 16 (1,600 steps) without
early stopping or dropout, and a wide encoder:
the encoder learns its 120 training cells, and held-out cells get markedly worse latent
positions (their amortization gap is several times the training cells').
"""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest

import sc_vi_ext as sv
from sc_vi_ext.diagnostics.history import overfitting_alarm, overfitting_epochs
from sc_vi_ext.diagnostics.trust import compare_to_reference
from sc_vi_ext.model_store import held_out_mask


@pytest.fixture(scope="module")
def overfit():
    adata = sv.datasets.simulate(240, 200, n_batches=1, n_types=3, random_state=5)
    with pytest.warns(UserWarning, match="overfits") as rec:
        sv.tl.vae(adata, train_size=0.5, max_epochs=200, batch_size=16, lr=1e-3, dropout=0.0, early_stopping=False,
                  n_hidden=128, gap_every=50, progress=False)
    adata.uns["alarm"] = str(rec[0].message)
    return adata


def test_overfitting_alarm_fires(overfit):
    h = overfit.uns["vae"]["history"]
    last = np.flatnonzero(np.isfinite(h["amortization_gap_train"]))[-1]
    assert h["amortization_gap_validation"][last] > 2 * h["amortization_gap_train"][last]
    assert np.isfinite(h["amortization_gap_validation_se"][last])
    assert "held-out" in overfit.uns["alarm"] and "gap_history" in overfit.uns["alarm"]
    ax = sv.pl.gap_history(overfit, show=False)
    assert isinstance(ax, plt.Axes)
    # the plot says so too: its title names the first overfitting epoch, whose interval is shaded red
    first = int(np.asarray(h["epoch"])[overfitting_epochs(h)][0])
    assert ax.get_title(loc="left").startswith(f"Held-out gap well above the training gap from epoch {first}")
    red = [p for p in ax.patches if p.get_facecolor()[:3] == (1.0, 0.0, 0.0)]
    assert red and max(p.get_x() + p.get_width() for p in red) == h["epoch"][last]
    plt.close("all")


def test_no_alarm_when_gaps_agree():
    h = {"epoch": [1, 2], "amortization_gap_train": [np.nan, 1.0], "amortization_gap_validation": [np.nan, 1.2],
         "amortization_gap_train_se": [np.nan, 0.1], "amortization_gap_validation_se": [np.nan, 0.2]}
    assert overfitting_alarm(h) is None
    h["amortization_gap_validation"] = [np.nan, 5.0]
    assert "overfits" in overfitting_alarm(h)
    assert overfitting_alarm(h, best_epoch=1) is None  # nothing recorded for the kept weights


def test_trust_score_separates_held_out_cells(overfit):
    out = sv.tl.trust_score(overfit, progress=False, copy=True)
    obs, res = out.obs, out.uns["vae"]["trust"]
    assert {"vae_trust", "vae_untrusted", "vae_gap_estimate"} <= set(obs)
    assert obs["vae_untrusted"].dtype == bool
    assert ((obs["vae_trust"] > 0) & (obs["vae_trust"] <= 1)).all()
    val = held_out_mask(out, "vae")
    # training cells are the reference: their median trust is about 0.5, held-out cells score worse
    assert 0.35 < res["train"]["trust_median"] < 0.65
    assert res["validation"]["trust_median"] < 0.5 * res["train"]["trust_median"]
    assert res["validation"]["frac_untrusted"] > 5 * max(res["train"]["frac_untrusted"], 0.01)
    assert obs["vae_trust"][val].mean() < obs["vae_trust"][~val].mean()
    assert "vae_trust" not in overfit.obs  # copy=True leaves the input alone


def test_compare_to_reference_by_depth():
    rng = np.random.default_rng(0)
    log_lib = rng.uniform(5, 9, 400)
    gap = 0.5 * log_lib + rng.normal(0, 0.1, 400)  # gaps grow with depth
    ref = np.arange(400) < 300
    gap[350] += 2.0  # one cell the encoder serves badly
    trust, z = compare_to_reference(gap, log_lib, ref, n_neighbors=50)
    assert trust[350] < 0.05 and z[350] > 5
    others = np.delete(np.arange(400), 350)
    assert (np.abs(z[others]) < 5).all()  # depth alone does not make a cell an outlier
    assert 0.4 < np.median(trust[~ref]) < 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="2 training cells"):
            compare_to_reference(gap, log_lib, np.arange(400) == 0)
