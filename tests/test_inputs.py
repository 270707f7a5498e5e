"""Bad input to ``sv.tl.vae`` raises a helpful error and leaves the AnnData exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import sc_vi_ext as sv


def _snapshot(adata):
    X = adata.X
    X = X.toarray() if sp.issparse(X) else np.array(X, copy=True)
    return {
        "shape": adata.shape,
        "obsm": sorted(adata.obsm),
        "uns": sorted(adata.uns),
        "layers": sorted(adata.layers),
        "obs": list(adata.obs.columns),
        "var": list(adata.var.columns),
        "X": X,
        "X_type": type(adata.X),
    }


def _assert_unchanged(adata, snap):
    now = _snapshot(adata)
    for k in snap:
        if k == "X":
            np.testing.assert_array_equal(now["X"], snap["X"])  # NaNs compare equal here
        else:
            assert now[k] == snap[k], k


def _set(adata, fmt, row, col, value):
    X = adata.X.toarray()
    X[row, col] = value
    adata.X = sp.csr_matrix(X) if fmt == "csr" else X


def _negative(ad, fmt):
    _set(ad, fmt, 3, 4, -1)


def _non_integer(ad, fmt):  # log-normalised, as after sc.pp.normalize_total + sc.pp.log1p
    X = ad.X.toarray()
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    ad.X = X if fmt == "dense" else sp.csr_matrix(X)


def _nan(ad, fmt):
    _set(ad, fmt, 5, 0, np.nan)


def _inf(ad, fmt):
    _set(ad, fmt, 5, 0, np.inf)


def _zero_cells(ad, fmt):
    X = ad.X.toarray()
    X[[2, 7, 11]] = 0
    ad.X = sp.csr_matrix(X) if fmt == "csr" else X


VALUE_ERRORS = {
    "negative": (_negative, r"negative values.*raw"),
    "non-integer": (_non_integer, r"non-integer values.*raw counts.*layer="),
    "nan": (_nan, r"NaN"),
    "inf": (_inf, r"infinite"),
    "zero-count-cells": (_zero_cells, r"^3 cell\(s\) have zero total counts.*sc\.pp\.filter_cells"),
}


@pytest.mark.parametrize("fmt", ["csr", "dense"])
@pytest.mark.parametrize("case", list(VALUE_ERRORS))
def test_bad_values(case, fmt, sim):
    make_bad, match = VALUE_ERRORS[case]
    make_bad(sim, fmt)
    snap = _snapshot(sim)
    with pytest.raises(ValueError, match=match):
        sv.tl.vae(sim, max_epochs=2, progress=False)
    _assert_unchanged(sim, snap)


def test_bad_values_in_layer_name_the_layer(sim):
    sim.layers["counts"] = sim.X.copy()
    sim.layers["counts"].data[0] = 0.5
    snap = _snapshot(sim)
    with pytest.raises(ValueError, match=r"adata\.layers\['counts'\] contains non-integer"):
        sv.tl.vae(sim, layer="counts", max_epochs=2, progress=False)
    _assert_unchanged(sim, snap)


KEY_ERRORS = {
    "missing-layer": ({"layer": "counts"}, r"'counts' not found in adata\.layers"),
    "missing-batch-key": ({"batch_key": "donor"}, r"batch_key 'donor' is not a column of adata\.obs"),
}


@pytest.mark.parametrize("case", list(KEY_ERRORS))
def test_missing_keys(case, sim):
    kwargs, match = KEY_ERRORS[case]
    snap = _snapshot(sim)
    with pytest.raises(KeyError, match=match):
        sv.tl.vae(sim, max_epochs=2, progress=False, **kwargs)
    _assert_unchanged(sim, snap)


ARG_ERRORS = {
    "likelihood": ({"likelihood": "gaussian"}, r"likelihood must be one of .*'gaussian'"),
    "dispersion": ({"dispersion": "per-cell-type"}, r"dispersion must be one of .*'per-cell-type'"),
    "batch-size-1": ({"batch_size": 1}, r"batch_size"),
    "train-size-0": ({"train_size": 0.0}, r"train_size"),
    "train-size-above-1": ({"train_size": 1.5}, r"train_size"),
}


@pytest.mark.parametrize("case", list(ARG_ERRORS))
def test_invalid_arguments(case, sim):
    kwargs, match = ARG_ERRORS[case]
    snap = _snapshot(sim)
    with pytest.raises(ValueError, match=match):
        sv.tl.vae(sim, max_epochs=2, progress=False, **kwargs)
    _assert_unchanged(sim, snap)


@pytest.mark.parametrize("n_cells", [0, 1], ids=["no-cells", "one-cell"])
def test_too_few_cells(n_cells, sim):
    ad = sim[:n_cells].copy()
    snap = _snapshot(ad)
    with pytest.raises(ValueError, match=r"empty|at least 2 cells"):
        sv.tl.vae(ad, max_epochs=2, progress=False)
    _assert_unchanged(ad, snap)


def test_no_genes(sim):
    ad = sim[:, :0].copy()
    with pytest.raises(ValueError, match="empty"):
        sv.tl.vae(ad, max_epochs=2, progress=False)
    assert "X_vae" not in ad.obsm and "vae" not in ad.uns


def test_missing_batch_labels(sim):
    sim.obs["batch"] = sim.obs["batch"].astype(object)
    sim.obs.iloc[4, sim.obs.columns.get_loc("batch")] = None
    snap = _snapshot(sim)
    with pytest.raises(ValueError, match="missing values"):
        sv.tl.vae(sim, batch_key="batch", max_epochs=2, progress=False)
    _assert_unchanged(sim, snap)


def test_copy_true_bad_input_returns_nothing_and_changes_nothing(sim):
    _negative(sim, "csr")
    snap = _snapshot(sim)
    with pytest.raises(ValueError):
        sv.tl.vae(sim, copy=True, max_epochs=2, progress=False)
    _assert_unchanged(sim, snap)


def test_all_zero_genes_are_fine(sim):
    X = sim.X.toarray()
    X[:, [0, 5, 17]] = 0
    sim.X = sp.csr_matrix(X)
    sv.tl.vae(sim, max_epochs=5, n_hidden=16, progress=False)
    assert np.isfinite(sim.obsm["X_vae"]).all()
    assert np.isfinite(sim.uns["vae"]["history"]["elbo_train"]).all()


def test_explicit_zeros_in_csr_are_fine(sim):
    """Stored zeros in CSR data are counts of 0, not a reason to fail (nor a zero-count cell)."""
    X = sim.X.copy()
    X.data[::50] = 0  # stored zeros in many cells, each of which keeps other counts
    assert (X.data == 0).any()  # the case under test really happened
    sim.X = X
    out = sv.tl.vae(sim, max_epochs=3, n_hidden=16, progress=False, copy=True)
    assert np.isfinite(out.obsm["X_vae"]).all()
