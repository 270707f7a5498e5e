"""Unusual data that trains or is refused up front: non-canonical CSR, duplicate names, batches
without training cells, counts in ``adata.raw``, numbers that cannot be estimated, plots that
need an embedding. README.md, "Bad input", lists the same cases."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import sc_vi_ext as sv


def test_latent_with_a_missing_basis_writes_nothing(trained, unchanged):
    check = unchanged(trained)
    with pytest.raises(KeyError, match=r"X_pca.*not found"):
        sv.pl.latent(trained, basis="pca", show=False)
    check()
    assert "neighbors" not in trained.uns and not len(trained.obsp)


@pytest.mark.parametrize("axis", ["var", "obs"])
def test_duplicate_names_are_refused_before_training(axis, sim, unchanged):
    names = list(getattr(sim, f"{axis}_names"))
    names[3] = names[0]
    setattr(sim, f"{axis}_names", names)
    check = unchanged(sim)
    with pytest.raises(ValueError, match=rf"adata\.{axis}_names are not unique \(e\.g\. \['{names[0]}'\]\).*"
                                         rf"adata\.{axis}_names_make_unique\(\)"):
        sv.tl.vae(sim, max_epochs=2, progress=False)
    check()


def test_duplicate_cell_names_are_never_counted_as_held_out(trained, unchanged):
    held_out = trained.uns["vae"]["validation_obs_names"]
    names = list(trained.obs_names)
    names[names.index(held_out[0]) - 1] = held_out[0]  # a training cell now shares a held-out cell's name
    trained.obs_names = names
    check = unchanged(trained)
    with pytest.raises(ValueError, match="obs_names are not unique.*held-out cells are stored by name"):
        sv.tl.amortization_gap(trained, n_cells=None, n_samples=8, n_samples_elbo=4, max_steps=5, progress=False)
    check()


def test_batch_without_training_cells_warns_and_gets_the_pooled_prior(sim):
    from sc_vi_ext.tl._utils import split_indices

    _, val = split_indices(sim.n_obs, 0.9, np.random.default_rng(0))  # tl.vae's split with random_state=0
    batch = sim.obs["batch"].astype(str).to_numpy()
    batch[val[:3]] = "only_held_out"
    sim.obs["batch"] = batch
    with pytest.warns(UserWarning, match=r"\['only_held_out'\] of adata\.obs\['batch'\] have no training cells"):
        sv.tl.vae(sim, batch_key="batch", library="latent", max_epochs=2, n_hidden=16, progress=False)
    model = sv.get_model(sim)
    b = sim.uns["vae"]["batch_categories"].index("only_held_out")
    train = ~sim.obs_names.isin(sim.uns["vae"]["validation_obs_names"])
    log_totals = np.log(np.asarray(sim.X[train].sum(1)).ravel())
    assert model.library_prior_mean[b].item() == pytest.approx(log_totals.mean(), rel=1e-5)
    assert model.library_prior_log_var[b].item() == pytest.approx(np.log(log_totals.var()), rel=1e-4)


def _in_pieces(X):
    """The same counts as a non-canonical CSR: every count stored as two entries (1 = 0.5 + 0.5, 5 = 2 + 3)."""
    X = sp.csr_matrix(X)
    first = np.where(X.data == 1, 0.5, np.floor(X.data / 2))
    data = np.stack([first, X.data - first], 1).ravel()  # both pieces of an entry side by side
    out = sp.csr_matrix((data, np.repeat(X.indices, 2), 2 * X.indptr), shape=X.shape)
    assert not out.has_canonical_format and out.nnz == 2 * X.nnz
    np.testing.assert_array_equal(out.toarray(), X.toarray())
    return out


@pytest.mark.parametrize("backed", [False, True], ids=["in-memory", "backed"])
def test_non_canonical_csr_trains_as_its_sum(backed, sim, fast, tmp_path):
    pieces = sim.copy()
    pieces.X = _in_pieces(sim.X)
    kept = (pieces.X.data.copy(), pieces.X.indices.copy(), pieces.X.indptr.copy())
    if backed:
        pieces.write_h5ad(tmp_path / "pieces.h5ad")
        sim.write_h5ad(tmp_path / "sim.h5ad")
        pieces, sim = (ad.read_h5ad(tmp_path / f"{n}.h5ad", backed="r") for n in ("pieces", "sim"))
    sv.tl.vae(sim, **fast)
    sv.tl.vae(pieces, **fast)
    np.testing.assert_allclose(pieces.uns["vae"]["history"]["elbo_train"], sim.uns["vae"]["history"]["elbo_train"],
                               rtol=1e-6)
    np.testing.assert_allclose(pieces.obsm["X_vae"], sim.obsm["X_vae"], rtol=1e-5, atol=1e-6)
    sv.tl.log_likelihood(sim, n_samples=10, progress=False)
    sv.tl.log_likelihood(pieces, n_samples=10, progress=False)
    np.testing.assert_allclose(pieces.obs["vae_log_px"], sim.obs["vae_log_px"], rtol=1e-6)
    if not backed:  # the user's matrix keeps its entries
        for a, b in zip(kept, (pieces.X.data, pieces.X.indices, pieces.X.indptr), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_single_cell_split_warns_that_its_standard_errors_are_nan(trained):
    held_out = trained.obs_names.isin(trained.uns["vae"]["validation_obs_names"])
    sub = trained[np.flatnonzero(held_out)[:1].tolist() + np.flatnonzero(~held_out)[:5].tolist()].copy()
    with pytest.warns(UserWarning, match="one evaluated cell only among the 'validation' cells.*NaN") as rec:
        sv.tl.amortization_gap(sub, n_cells=None, n_samples=8, n_samples_elbo=4, max_steps=5, progress=False)
    assert np.isnan(sub.uns["vae"]["amortization_gap"]["validation"]["amortization_gap_se"])
    assert [w.filename for w in rec if "one evaluated cell" in str(w.message)] == [__file__]


def test_posterior_predictive_warns_where_a_summary_cannot_be_estimated(sim):
    one = sim[:, :1].copy()  # one gene: totals are that gene, so the cells kept have no zeros
    one = one[np.asarray(one.X.sum(1)).ravel() > 0].copy()
    sv.tl.vae(one, max_epochs=2, n_hidden=8, progress=False)
    with pytest.warns(UserWarning, match=r"mean_abs_log_ratio of \['frac_zero'\] is NaN") as rec:
        sv.tl.posterior_predictive(one, n_samples=2, progress=False)
    assert one.uns["vae"]["posterior_predictive"]["summary"]["frac_zero"]["n_genes"] == 0
    assert [w.filename for w in rec if "NaN" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning), pytest.warns(UserWarning, match="n_samples=1 the replicates' spread cannot"):
        sv.tl.posterior_predictive(one, n_samples=1, progress=False)


def _cellxgene(sim):
    """The CELLxGENE layout: adata.X normalised and log-transformed, the raw counts in adata.raw (more genes)."""
    a = sim.copy()
    a.raw = sim.copy()  # its own matrix: normalize_total works in place
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a[:, a.var_names[10:][::-1]].copy()  # fewer genes than raw, in another order


def test_normalised_x_with_counts_in_raw_names_raw(sim, unchanged):
    a = _cellxgene(sim)
    check = unchanged(a)
    with pytest.raises(ValueError, match=r"adata\.X contains non-integer values.*adata\.raw holds raw counts.*"
                                         r"use_raw=True"):
        sv.tl.vae(a, max_epochs=2, progress=False)
    check()


def test_use_raw_trains_on_the_raw_counts_of_var_names(sim, fast):
    a = _cellxgene(sim)
    sv.tl.vae(a, use_raw=True, **fast)
    plain = sim[:, a.var_names].copy()  # the same counts, in X
    sv.tl.vae(plain, **fast)
    np.testing.assert_allclose(a.obsm["X_vae"], plain.obsm["X_vae"], rtol=1e-5, atol=1e-6)
    assert a.uns["vae"]["params"]["use_raw"] is True and list(a.uns["vae"]["var_names"]) == list(a.var_names)
    sv.tl.log_likelihood(a, n_samples=10, progress=False)  # the tools read the counts in raw too
    sv.tl.log_likelihood(plain, n_samples=10, progress=False)
    np.testing.assert_allclose(a.obs["vae_log_px"], plain.obs["vae_log_px"], rtol=1e-5)


@pytest.mark.parametrize("case, match", [("no-raw", r"use_raw=True, but adata\.raw is None"),
                                         ("with-layer", r"use_raw=True and layer='counts' name two places"),
                                         ("gene-not-in-raw", r"1 gene\(s\) of adata\.var_names are not in adata\.raw")])
def test_use_raw_errors(case, match, sim, unchanged):
    sim.layers["counts"] = sim.X.copy()
    if case == "gene-not-in-raw":
        sim.raw = sim[:, 1:].copy()
    elif case == "with-layer":
        sim.raw = sim
    check = unchanged(sim)
    with pytest.raises(ValueError, match=match):
        sv.tl.vae(sim, use_raw=True, layer="counts" if case == "with-layer" else None, max_epochs=2, progress=False)
    check()
