"""scVI model options (likelihoods, latent library, dispersion, logistic normal, covariates, size factors, depth)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import sc_vi_ext as sv
from sc_vi_ext.model_store import stored_loader

# every model option once (test_vae.py and this file used to train several of them twice);
# the checks below are derived from the options, so a new entry is checked like the others
OPTIONS = {
    "zinb-default": {},
    "nb": {"likelihood": "nb"},
    "poisson": {"likelihood": "poisson"},
    "latent-library-batches": {"library": "latent", "batch_key": "batch"},
    "latent-library-batches-nb": {"library": "latent", "batch_key": "batch", "likelihood": "nb"},
    "gene-cell-dispersion": {"dispersion": "gene-cell"},
    "gene-batch-dispersion": {"dispersion": "gene-batch", "batch_key": "batch"},
    "logistic-normal": {"latent_distribution": "ln"},
    "covariates-encoded": {"batch_key": "batch", "categorical_covariate_keys": ["donor"],
                           "continuous_covariate_keys": ["pct_mito"], "encode_covariates": True},
    "size-factor": {"size_factor_key": "size_factor"},
    "two-layers-nb-5d": {"n_layers": 2, "likelihood": "nb", "n_latent": 5},
}


@pytest.fixture(scope="module")
def data():
    adata = sv.datasets.simulate(200, 40, n_batches=2, n_types=3, random_state=0)
    rng = np.random.default_rng(0)
    adata.obs["donor"] = rng.choice(["d1", "d2", "d3"], adata.n_obs)
    adata.obs["pct_mito"] = rng.random(adata.n_obs).astype(np.float32)
    adata.obs["size_factor"] = np.asarray(adata.X.sum(1)).ravel()
    return adata


def _assert_architecture(model: dict, module, opts: dict) -> None:
    """The stored weights are those of the model the options ask for."""
    likelihood, n_layers = opts.get("likelihood", "zinb"), opts.get("n_layers", 1)
    gene_cell = opts.get("dispersion") == "gene-cell" and likelihood != "poisson"
    assert ("log_theta" in model) == (likelihood != "poisson" and not gene_cell)
    if "log_theta" in model:  # one dispersion per gene, or per gene and batch
        assert model["log_theta"].shape == (2 if opts.get("dispersion") == "gene-batch" else 1, 40)
    assert ("decoder.log_theta.weight" in model) == gene_cell
    assert ("decoder.zi_logits.weight" in model) == (likelihood == "zinb")
    for part in ("encoder", "decoder"):
        assert f"{part}.net.layers.{n_layers - 1}.0.weight" in model
        assert f"{part}.net.layers.{n_layers}.0.weight" not in model
    latent_library = opts.get("library") == "latent"
    assert any(k.startswith("library_encoder.") for k in model) == latent_library
    assert module.latent_dim == opts.get("n_latent", 10) + latent_library


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_round_trips_and_diagnoses(data, name, tmp_path):
    opts = OPTIONS[name]
    adata = data.copy()
    # small batches: enough steps for BatchNorm running statistics (momentum 0.01) to settle
    sv.tl.vae(adata, max_epochs=15, n_epochs_kl_warmup=1, batch_size=32, n_hidden=32, progress=False, **opts)
    h = adata.uns["vae"]["history"]
    assert np.isfinite(h["elbo_validation"]).all()
    assert h["elbo_validation"][-1] > h["elbo_validation"][0]
    for k, v in opts.items():
        stored = adata.uns["vae"]["params"][k]
        assert list(stored) == v if isinstance(v, list) else stored == v
    z = adata.obsm["X_vae"]
    assert z.shape == (adata.n_obs, opts.get("n_latent", 10)) and np.isfinite(z).all()
    if opts.get("latent_distribution") == "ln":  # softmax of z: points on the simplex
        np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-5)
        assert (z > 0).all()
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    module = sv.get_model(back)
    _assert_architecture(back.uns["vae"]["model"], module, opts)
    mb = next(iter(stored_loader(back, "vae", np.arange(back.n_obs), batch_size=back.n_obs)))
    with torch.no_grad():
        rep = module.representation(module.inference(mb.x, mb.batch, mb.cov)[0]).numpy()
    np.testing.assert_allclose(rep, z, rtol=1e-5, atol=1e-6)
    sv.tl.amortization_gap(back, n_cells=15, n_samples=50, n_samples_elbo=64, max_steps=60, progress=False)
    o = back.obs.dropna(subset=["vae_elbo"])
    assert len(o) == 15
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
