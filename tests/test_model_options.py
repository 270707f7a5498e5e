"""scVI model options: latent library, gene-cell dispersion, logistic normal, covariates, size factors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import sc_vi_ext as sv
from sc_vi_ext.model_store import stored_loader

OPTIONS = {
    "latent-library": {"library": "latent", "batch_key": "batch"},
    "gene-cell": {"dispersion": "gene-cell"},
    "ln": {"latent_distribution": "ln"},
    "covariates": {"batch_key": "batch", "categorical_covariate_keys": ["donor"],
                   "continuous_covariate_keys": ["pct_mito"], "encode_covariates": True},
    "size-factor": {"size_factor_key": "size_factor"},
    "two-layers-nb": {"n_layers": 2, "likelihood": "nb"},
}


@pytest.fixture(scope="module")
def data():
    adata = sv.datasets.simulate(200, 40, n_batches=2, n_types=3, random_state=0)
    rng = np.random.default_rng(0)
    adata.obs["donor"] = rng.choice(["d1", "d2", "d3"], adata.n_obs)
    adata.obs["pct_mito"] = rng.random(adata.n_obs).astype(np.float32)
    adata.obs["size_factor"] = np.asarray(adata.X.sum(1)).ravel()
    return adata


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_round_trips_and_diagnoses(data, name, tmp_path):
    adata = data.copy()
    # small batches: enough steps for BatchNorm running statistics (momentum 0.01) to settle
    sv.tl.vae(adata, max_epochs=15, n_epochs_kl_warmup=1, batch_size=32, n_hidden=32, progress=False, **OPTIONS[name])
    h = adata.uns["vae"]["history"]
    assert np.isfinite(h["elbo_validation"]).all()
    assert h["elbo_validation"][-1] > h["elbo_validation"][0]
    for k, v in OPTIONS[name].items():
        stored = adata.uns["vae"]["params"][k]
        assert list(stored) == v if isinstance(v, list) else stored == v
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    module = sv.get_model(back)
    mb = next(iter(stored_loader(back, "vae", np.arange(back.n_obs), batch_size=back.n_obs)))
    with torch.no_grad():
        rep = module.representation(module.inference(mb.x, mb.batch, mb.cov)[0]).numpy()
    np.testing.assert_allclose(rep, adata.obsm["X_vae"], rtol=1e-5, atol=1e-6)
    sv.tl.amortization_gap(back, n_cells=15, n_samples=50, n_samples_elbo=64, max_steps=60, progress=False)
    o = back.obs.dropna(subset=["vae_elbo"])
    assert (o["vae_amortization_gap"] > -3 * o["vae_amortization_gap_se"] - 1e-6).all()


def test_latent_library_prior_from_data(data):
    adata = data.copy()
    sv.tl.vae(adata, library="latent", batch_key="batch", max_epochs=2, n_hidden=16, progress=False)
    module = sv.get_model(adata)
    assert module.latent_dim == module.n_latent + 1
    train = np.setdiff1d(np.arange(adata.n_obs), adata.obs_names.get_indexer(adata.uns["vae"]["validation_obs_names"]))
    log_tot = np.log(np.asarray(adata.X.sum(1)).ravel())
    codes = adata.obs["batch"].cat.codes.to_numpy()
    for b in range(2):
        expect = log_tot[train][codes[train] == b].mean()
        assert module.library_prior_mean[b].item() == pytest.approx(expect, rel=1e-5)


def test_logistic_normal_latent_is_on_the_simplex(data):
    adata = data.copy()
    sv.tl.vae(adata, latent_distribution="ln", max_epochs=2, n_hidden=16, progress=False)
    np.testing.assert_allclose(adata.obsm["X_vae"].sum(1), 1.0, rtol=1e-5)


def test_covariate_errors_leave_adata_untouched(data):
    adata = data.copy()
    with pytest.raises(KeyError, match="nope"):
        sv.tl.vae(adata, categorical_covariate_keys=["nope"], progress=False)
    adata.obs["bad"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sv.tl.vae(adata, continuous_covariate_keys=["bad"], progress=False)
    with pytest.raises(ValueError, match="library"):
        sv.tl.vae(adata, library="both", progress=False)
    assert "vae" not in adata.uns and "X_vae" not in adata.obsm
