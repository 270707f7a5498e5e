"""Bundled PBMC counts and the NB simulator."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import sc_vi_ext as sv


@pytest.fixture(scope="module")
def pbmc():
    return sv.datasets.pbmc68k()


def _dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def test_pbmc68k_shape_and_counts(pbmc):
    assert pbmc.shape == (700, 765)
    X = _dense(pbmc.X)
    assert (X >= 0).all()
    np.testing.assert_array_equal(X, np.round(X))
    assert (X.sum(1) > 0).all()
    assert X.max() > 100  # real counts, not a normalised or binary matrix
    np.testing.assert_array_equal(_dense(pbmc.layers["counts"]), X)
    assert pbmc.obs["bulk_labels"].nunique() == 10
    assert pbmc.obs["bulk_labels"].notna().all()


def test_pbmc68k_rounding_recovery_is_valid(pbmc):
    """expm1(raw) * n_counts / 1e4 is within 0.1 of an integer everywhere, and rounds to X."""
    ref = sc.datasets.pbmc68k_reduced()
    raw = _dense(ref.raw.X).astype(np.float64)
    scaled = np.expm1(raw) * ref.obs["n_counts"].to_numpy()[:, None] / 1e4
    assert np.abs(scaled - np.rint(scaled)).max() < 0.1
    np.testing.assert_array_equal(np.rint(scaled), _dense(pbmc.X))
    np.testing.assert_array_equal(pbmc.obs_names, ref.obs_names)
    np.testing.assert_array_equal(pbmc.var_names, ref.raw.var_names)
    # the counts give back scanpy's log-normalised values
    renorm = np.log1p(_dense(pbmc.X) / ref.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(renorm, raw, atol=1e-3)


@pytest.mark.parametrize(
    ("n_cells", "n_genes", "n_batches", "n_types"),
    [(200, 60, 2, 5), (50, 30, 1, 2), (120, 80, 3, 4)],
)
def test_simulate_shapes_and_columns(n_cells, n_genes, n_batches, n_types):
    ad = sv.datasets.simulate(n_cells, n_genes, n_batches=n_batches, n_types=n_types, n_markers=5, random_state=0)
    assert ad.shape == (n_cells, n_genes)
    assert sp.issparse(ad.X)
    X = ad.X.toarray()
    assert (X >= 0).all()
    np.testing.assert_array_equal(X, np.round(X))
    assert {"cell_type", "batch"} <= set(ad.obs.columns)
    assert set(ad.obs["cell_type"]) <= {f"type_{t}" for t in range(n_types)}
    assert set(ad.obs["batch"]) <= {f"batch_{b}" for b in range(n_batches)}
    assert "marker_of" in ad.var.columns
    assert ad.uns["simulation"]["n_types"] == n_types
    assert ad.obs_names.is_unique and ad.var_names.is_unique


def test_simulate_reproducible():
    a = sv.datasets.simulate(100, 40, random_state=3)
    b = sv.datasets.simulate(100, 40, random_state=3)
    c = sv.datasets.simulate(100, 40, random_state=4)
    assert (a.X != b.X).nnz == 0
    assert (a.obs == b.obs).all().all()
    assert (a.var["marker_of"] == b.var["marker_of"]).all()
    assert (a.X != c.X).nnz > 0


def test_simulate_markers():
    """Each type has n_markers marker genes, and they are higher in that type than elsewhere."""
    ad = sv.datasets.simulate(1000, 100, n_types=4, n_markers=6, random_state=0)
    marker_of = ad.var["marker_of"]
    assert (marker_of == "").sum() == 100 - 4 * 6
    X = ad.X.toarray()
    X = X / X.sum(1, keepdims=True)
    for t in range(4):
        genes = (marker_of == f"type_{t}").to_numpy()
        assert genes.sum() == 6
        in_type = (ad.obs["cell_type"] == f"type_{t}").to_numpy()
        ratio = X[in_type][:, genes].mean(0) / X[~in_type][:, genes].mean(0)
        assert (ratio > 2).all(), ratio


def test_simulate_batch_effect_and_dispersion():
    """Batches shift the expression profile; counts are overdispersed (variance > mean)."""
    ad = sv.datasets.simulate(2000, 50, n_batches=2, n_types=1, dispersion=2.0, random_state=0)
    X = ad.X.toarray()
    prof = [X[(ad.obs["batch"] == b).to_numpy()].sum(0) for b in ("batch_0", "batch_1")]
    prof = [p / p.sum() for p in prof]
    assert np.abs(np.log(prof[0] / prof[1])).mean() > 0.2
    # per gene, variance of library-normalised counts exceeds Poisson
    assert (X.var(0) > X.mean(0)).mean() > 0.9


def test_simulate_type_sd_sets_how_far_types_are_apart():
    """type_sd scales the types' deviation from the shared profile: 0 (and no markers) makes
    the types one population; the default is 0.3."""
    default = sv.datasets.simulate(300, 50, random_state=3)
    # the same counts as before type_sd existed (checksum taken with git 32e5ba7)
    assert hashlib.sha256(default.X.toarray().tobytes()).hexdigest()[:16] == "a5f065da634abce8"
    assert default.uns["simulation"]["type_sd"] == 0.3

    def spread(a):  # how far the types' mean log-expressions are from each other
        lg = np.log1p(a.X.toarray() / a.X.sum(1).A * 1e3)
        means = np.stack([lg[(a.obs["cell_type"] == t).to_numpy()].mean(0) for t in a.obs["cell_type"].cat.categories])
        return float(means.std(0).mean())

    same = sv.datasets.simulate(3000, 50, n_markers=0, type_sd=0.0, random_state=3)
    far = sv.datasets.simulate(3000, 50, n_markers=0, type_sd=1.0, random_state=3)
    assert spread(far) > 3 * spread(same)
