"""Unusual data that trains or is refused up front: non-canonical CSR, duplicate names, batches
without training cells, counts in ``adata.raw``, numbers that cannot be estimated, plots that
need an embedding. README.md, "Bad input", lists the same cases."""

from __future__ import annotations

import numpy as np
import pytest

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
