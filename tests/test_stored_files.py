"""Stored models that come back from other formats or untrusted files: zarr round trips, settings
that disagree with the stored weights, and result names that two keys could share."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import sc_vi_ext as sv

RUNS = {
    "log_likelihood": lambda a: sv.tl.log_likelihood(a, n_samples=10, progress=False),
    "amortization_gap": lambda a: sv.tl.amortization_gap(a, n_cells=40, n_samples=20, n_samples_elbo=8,
                                                         max_steps=10, progress=False),
    "trust_score": lambda a: sv.tl.trust_score(a, max_steps=5, n_neighbors=20, progress=False),
    "refine": lambda a: sv.tl.refine(a, max_steps=10, n_samples_elbo=4, progress=False),
    "normalized_expression": lambda a: sv.tl.normalized_expression(a, n_samples=0, transform_batch="batch_0",
                                                                   progress=False),
    "differential_expression": lambda a: sv.tl.differential_expression(a, groupby="cell_type", n_samples=10,
                                                                       progress=False),
    "posterior_predictive": lambda a: sv.tl.posterior_predictive(a, n_samples=2, progress=False),
}


@pytest.fixture(scope="module")
def batch_model(sim_session):
    """A model with batches: its batch categories, gene and held-out cell names are all stored as strings."""
    return sv.tl.vae(sim_session, batch_key="batch", max_epochs=3, n_hidden=16, progress=False, copy=True)


def test_zarr_round_trip_keeps_every_tool_working(batch_model, tmp_path):
    batch_model.write_zarr(tmp_path / "a.zarr")
    back = ad.read_zarr(tmp_path / "a.zarr")
    np.testing.assert_array_equal(sv.get_model(back).state_dict()["log_theta"].numpy(),
                                  batch_model.uns["vae"]["model"]["log_theta"])
    for name, run in RUNS.items():
        run(back)
        assert name  # every tool ran on the names zarr gave back
    held_out = back.uns["vae"]["amortization_gap"]["validation"]["n_cells"]
    assert 0 < held_out < 40
    query = sv.datasets.simulate(60, 60, random_state=1)
    sv.tl.vae_map(query, reference=back, max_epochs=2, progress=False)
    back.write_zarr(tmp_path / "b.zarr")  # and back again, with the tools' results
    again = ad.read_zarr(tmp_path / "b.zarr")
    sv.tl.log_likelihood(again, n_samples=10, progress=False)
    sc.pp.neighbors(again, use_rep="X_vae")
    again.write_h5ad(tmp_path / "c.h5ad")
    sv.tl.vae(ad.read_h5ad(tmp_path / "c.h5ad"), batch_key="batch", max_epochs=2, n_hidden=16, progress=False)


@pytest.mark.parametrize("setting, value", [("n_hidden", 10**7), ("n_layers", 10**4), ("n_latent", 10**8),
                                            ("n_genes", 10**9), ("n_cov", 10**6), ("n_hidden", "128"),
                                            ("n_layers", 0), ("n_latent", 2.5)])
def test_settings_are_checked_against_the_weights_before_building(setting, value, trained, monkeypatch):
    """An altered setting fails with the usual error before any model is built (none of its memory allocated)."""
    import time

    import torch

    from sc_vi_ext import model_store

    real = model_store.VAE

    def only_shapes(*args, **kwargs):  # building on the meta device allocates nothing
        assert torch.get_default_device().type == "meta", "a model was built before its settings were checked"
        return real(*args, **kwargs)

    monkeypatch.setattr(model_store, "VAE", only_shapes)
    trained.uns["vae"]["params"][setting] = value
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"model stored in adata\.uns\['vae'\]\['model'\] is damaged.*retrain"):
        sv.get_model(trained)
    assert time.perf_counter() - t0 < 1.0


@pytest.fixture
def two_keys(sim_session):
    """A model under "vae" and another under "vae_refined", whose latent is obsm["X_vae_refined"]."""
    a = sv.tl.vae(sim_session, max_epochs=2, n_hidden=16, progress=False, copy=True)
    sv.tl.vae(a, key_added="vae_refined", max_epochs=2, n_hidden=16, progress=False)
    return a


def test_retraining_one_key_keeps_the_latent_of_another(two_keys):
    latent = two_keys.obsm["X_vae_refined"].copy()
    sv.tl.vae(two_keys, max_epochs=2, n_hidden=16, progress=False)
    np.testing.assert_array_equal(two_keys.obsm["X_vae_refined"], latent)
    sv.tl.log_likelihood(two_keys, key="vae_refined", n_samples=5, progress=False)


def test_a_result_never_overwrites_another_keys(two_keys, unchanged):
    check = unchanged(two_keys)
    latent = two_keys.obsm["X_vae_refined"].copy()
    with pytest.raises(ValueError, match=r"obsm\['X_vae_refined'\] holds the result of the model stored under "
                                         r"'vae_refined'.*another key"):
        sv.tl.refine(two_keys, max_steps=5, n_samples_elbo=4, progress=False)
    np.testing.assert_array_equal(two_keys.obsm["X_vae_refined"], latent)
    check()


def test_training_under_a_name_that_holds_a_derived_result_is_refused(trained, unchanged):
    sv.tl.refine(trained, max_steps=5, n_samples_elbo=4, progress=False)
    sv.tl.differential_expression(trained, groupby="cell_type", n_samples=5, progress=False)
    check = unchanged(trained)
    for name, attr in (("vae_refined", "obsm"), ("vae_de", "uns")):
        with pytest.raises(ValueError, match=rf"adata\.{attr}\[.*\] holds a result derived from the model stored "
                                             r"under 'vae'"):
            sv.tl.vae(trained, key_added=name, max_epochs=2, progress=False)
        check()
