"""Query mapping: a held-out batch lands on the reference's cell types; reference weights stay."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

import sc_vi_ext as sv


@pytest.fixture(scope="module")
def ref_query():
    adata = sv.datasets.simulate(900, 80, n_batches=3, n_types=4, random_state=0)
    ref = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    query = query[:, query.var_names[4:]].copy()  # the query lacks 4 of the reference's genes
    sv.tl.vae(ref, batch_key="batch", max_epochs=30, n_hidden=64, batch_size=64, progress=False)
    return ref, query


def test_new_batch_maps_onto_reference_types(ref_query):
    ref, query = ref_query
    out = sv.tl.vae_map(query, reference=ref, max_epochs=20, progress=False, copy=True)
    m = out.uns["vae"]["mapping"]
    assert m["new_batches"] == ["batch_2"] and m["n_genes_missing"] == 4
    assert m["trained_parameters"]  # something was fine-tuned
    w_ref = ref.uns["vae"]["model"]["decoder.net.layers.0.0.weight"]
    w_map = out.uns["vae"]["model"]["decoder.net.layers.0.0.weight"]
    np.testing.assert_array_equal(w_map[:, : w_ref.shape[1]], w_ref)  # reference columns frozen
    assert np.abs(w_map[:, w_ref.shape[1]:]).sum() > 0  # the new batch's column learned
    for k, v in ref.uns["vae"]["model"].items():
        if v.shape == out.uns["vae"]["model"][k].shape:
            np.testing.assert_array_equal(out.uns["vae"]["model"][k], v)
    clf = KNeighborsClassifier(n_neighbors=15).fit(ref.obsm["X_vae"], ref.obs["cell_type"].astype(str))
    acc = (clf.predict(out.obsm["X_vae"]) == out.obs["cell_type"].astype(str)).mean()
    assert acc > 0.9
    assert "X_vae" not in query.obsm  # copy=True


def test_gap_diagnostics_on_query(ref_query):
    ref, query = ref_query
    q = query.copy()
    sv.tl.vae_map(q, reference=ref, max_epochs=5, progress=False)
    sv.tl.amortization_gap(q, n_cells=30, n_samples=50, n_samples_elbo=64, max_steps=60, progress=False)
    o = q.obs.dropna(subset=["vae_elbo"])
    assert len(o) == 30
    assert (o["vae_amortization_gap"] > -3 * o["vae_amortization_gap_se"] - 1e-6).all()
    sv.tl.log_likelihood(q, n_samples=20, subset=np.arange(10), progress=False)
    assert q.obs["vae_log_px"].notna().sum() == 10


def test_known_batch_needs_no_training_and_bad_reference(ref_query):
    ref, _ = ref_query
    q = ref[ref.obs["batch"] == "batch_0"].copy()
    sv.tl.vae_map(q, reference=ref, progress=False)
    assert q.uns["vae"]["mapping"]["new_batches"] == []
    pos = np.flatnonzero(ref.obs["batch"] == "batch_0")
    np.testing.assert_allclose(q.obsm["X_vae"], ref.obsm["X_vae"][pos], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="no trained model"):
        sv.tl.vae_map(q, reference=q.copy(), key="other")


def test_latent_library_mapping_keeps_the_reference_library_encoder(ref_query):
    """With a latent library, a new batch gets its own library prior; the reference's trained
    library encoder and priors stay as they were."""
    ref, query = ref_query
    ref = ref.copy()
    sv.tl.vae(ref, batch_key="batch", library="latent", max_epochs=3, n_hidden=16, progress=False, n_threads=1)
    out = sv.tl.vae_map(query, reference=ref, max_epochs=2, progress=False, copy=True)
    before, after = ref.uns["vae"]["model"], out.uns["vae"]["model"]
    np.testing.assert_array_equal(after["library_encoder.mean.bias"], before["library_encoder.mean.bias"])
    n_ref = len(before["library_prior_mean"])
    np.testing.assert_array_equal(after["library_prior_mean"][:n_ref], before["library_prior_mean"])
    new_prior = after["library_prior_mean"][n_ref:]
    np.testing.assert_allclose(new_prior, np.log(query.X.sum(1)).mean(), rtol=1e-4)
