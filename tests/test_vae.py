"""``sv.tl.vae``: training behaviour, outputs, reproducibility, storage and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from anndata import read_h5ad

import sc_vi_ext as sv
import sc_vi_ext.train
from sc_vi_ext.dataloader import Minibatches
from sc_vi_ext.model_store import stored_loader
from sc_vi_ext.train import HISTORY_KEYS, evaluate


def _stored_latent(adata, key="vae"):
    """Latent means recomputed from the model stored in ``adata.uns[key]``."""
    module = sv.get_model(adata, key)
    with torch.no_grad():
        means = [module.inference(mb.x, mb.batch)[0] for mb in stored_loader(adata, key)]
        return np.concatenate([module.representation(m).numpy() for m in means])


def _assert_history_consistent(h, n_epochs=None):
    lengths = {k: len(v) for k, v in h.items()}
    assert len(set(lengths.values())) == 1, lengths
    assert set(HISTORY_KEYS) <= set(h)
    if n_epochs is not None:
        assert lengths["epoch"] == n_epochs
    np.testing.assert_array_equal(h["epoch"], np.arange(1, lengths["epoch"] + 1))


# --- the trained session model -------------------------------------------------------------


def test_outputs(trained_session, sim_session):
    ad = trained_session
    z = ad.obsm["X_vae"]
    assert z.shape == (sim_session.n_obs, 10)
    assert z.dtype == np.float32
    assert np.isfinite(z).all()
    assert z.std(0).min() > 1e-3  # not collapsed onto a constant
    uns = ad.uns["vae"]
    assert {"params", "history", "validation_obs_names", "var_names", "model", "batch_categories", "best_epoch",
            "stopped_early", "interrupted"} <= set(uns)
    assert 19 <= len(uns["validation_obs_names"]) <= 20  # about 10% of 200 cells held out (see test below)
    assert uns["interrupted"] is False
    assert 1 <= uns["best_epoch"] <= 20


@pytest.mark.parametrize(
    ("n_obs", "train_size", "n_val"),
    [(200, 0.9, 20), (1000, 0.9, 100), (10, 0.7, 3), (143, 0.9, 14), (50, 1.0, 0)],
)
def test_validation_split_size(n_obs, train_size, n_val):
    """train_size is the fraction of training cells: 0.9 of 200 cells trains on 180, validates on 20."""
    from sc_vi_ext.tl._vae import split_indices

    train_idx, val_idx = split_indices(n_obs, train_size, np.random.default_rng(0))
    assert len(val_idx) == n_val
    assert len(train_idx) == n_obs - n_val
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(n_obs))


def test_elbo_improves_and_is_finite(trained_session):
    h = trained_session.uns["vae"]["history"]
    for k, v in h.items():
        assert np.isfinite(v).all(), k
    assert h["elbo_validation"][-1] > h["elbo_validation"][0]
    assert h["elbo_train"][-1] > h["elbo_train"][0]
    # the columns are what they claim: ELBO = reconstruction - KL, KL >= 0
    for split in ("train", "validation"):
        np.testing.assert_allclose(h[f"elbo_{split}"], h[f"reconstruction_{split}"] - h[f"kl_{split}"], rtol=1e-6)
        assert (h[f"kl_{split}"] >= 0).all()
        assert (h[f"reconstruction_{split}"] < 0).all()  # log-probability of counts


def test_history_lengths_and_kl_warmup(trained_session):
    uns = trained_session.uns["vae"]
    h = uns["history"]
    _assert_history_consistent(h, n_epochs=20)
    w = np.asarray(h["kl_weight"])
    warmup = uns["params"]["n_epochs_kl_warmup"]
    assert warmup == 5  # a quarter of max_epochs by default
    assert 0 < w[0] < 1
    assert (np.diff(w) >= 0).all()
    assert w.max() == 1.0
    first_full = int(np.argmax(w == 1.0)) + 1
    assert first_full == warmup  # 1.0 from the end of the warm-up on, well before the end
    assert (w[first_full - 1:] == 1.0).all()


def test_best_weights_are_kept(trained_session):
    """The stored model is the best-validation epoch's: its validation ELBO is the recorded one."""
    ad = trained_session
    uns = ad.uns["vae"]
    h, best = uns["history"], uns["best_epoch"]
    warm = uns["params"]["n_epochs_kl_warmup"]
    assert h["elbo_validation"][best - 1] >= np.max(h["elbo_validation"][warm:]) - 1e-9
    loader = stored_loader(ad, "vae", ad.obs_names.get_indexer(uns["validation_obs_names"]), batch_size=1024)
    val = evaluate(sv.get_model(ad), loader, seed=uns["params"]["random_state"])
    assert val["elbo"] == pytest.approx(h["elbo_validation"][best - 1], rel=1e-5)


def test_latent_separates_cell_types(trained_session):
    from sc_vi_ext.metrics import knn_accuracy

    acc = knn_accuracy(trained_session.obsm["X_vae"], trained_session.obs["cell_type"])
    assert acc > 0.6  # 5 types: chance is about 0.2


def test_neighbors_and_leiden_run_on_output(trained):
    sc.pp.neighbors(trained, use_rep="X_vae")
    sc.tl.leiden(trained, flavor="igraph", n_iterations=2)
    assert trained.uns["neighbors"]["params"]["use_rep"] == "X_vae"
    assert trained.obs["leiden"].nunique() >= 2


# --- reproducibility, copy, storage -----------------------------------------------------------


def _assert_same_run(a, b):
    """Bit-identical latent, weights and history (all but the wall time of each epoch)."""
    np.testing.assert_array_equal(a.obsm["X_vae"], b.obsm["X_vae"])
    ha, hb = a.uns["vae"]["history"], b.uns["vae"]["history"]
    assert set(ha) == set(hb)
    for k in set(ha) - {"seconds"}:
        np.testing.assert_array_equal(ha[k], hb[k], err_msg=k)
    for k, v in a.uns["vae"]["model"].items():
        np.testing.assert_array_equal(v, b.uns["vae"]["model"][k], err_msg=k)


def test_reproducible_with_random_state(sim_session, trained_session, fast):
    """README's promise: the same seed, machine, torch version and thread count give the same run."""
    assert torch.get_num_threads() == 1  # as trained_session was trained (conftest)
    again = sv.tl.vae(sim_session, copy=True, **fast)
    _assert_same_run(again, trained_session)
    other = sv.tl.vae(sim_session, copy=True, random_state=1, **fast)
    assert not np.allclose(other.obsm["X_vae"], trained_session.obsm["X_vae"])
    assert not np.array_equal(other.uns["vae"]["validation_obs_names"],
                              trained_session.uns["vae"]["validation_obs_names"])


def test_reproducible_with_two_threads(sim_session):
    """The promise holds at another thread count too (within it, not across thread counts)."""
    kw = {"max_epochs": 4, "n_hidden": 32, "progress": False, "copy": True, "n_threads": 2}  # not load-dependent
    torch.set_num_threads(2)
    try:
        runs = [sv.tl.vae(sim_session, **kw) for _ in range(2)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    _assert_same_run(*runs)


def test_copy_true_leaves_input_untouched(sim, fast):
    before = (set(sim.obsm), set(sim.uns), sim.X.copy())
    out = sv.tl.vae(sim, copy=True, **fast)
    assert out is not sim
    assert "X_vae" in out.obsm and "vae" in out.uns
    assert (set(sim.obsm), set(sim.uns)) == before[:2]
    assert (sim.X != before[2]).nnz == 0


def test_copy_false_writes_in_place(sim, fast):
    assert sv.tl.vae(sim, copy=False, key_added="mine", **fast) is None
    assert "X_mine" in sim.obsm and "mine" in sim.uns
    assert "X_vae" not in sim.obsm
    np.testing.assert_array_equal(_stored_latent(sim, "mine"), sim.obsm["X_mine"])


def test_h5ad_round_trip(trained, tmp_path):
    path = tmp_path / "trained.h5ad"
    trained.write_h5ad(path)
    back = read_h5ad(path)
    p = back.uns["vae"]["params"]
    assert "layer" in p and "batch_key" in p
    assert p["likelihood"] == "zinb" and int(p["n_hidden"]) == 32
    np.testing.assert_array_equal(back.obsm["X_vae"], trained.obsm["X_vae"])
    np.testing.assert_array_equal(back.uns["vae"]["var_names"], trained.var_names)  # the model keeps its genes
    np.testing.assert_array_equal(back.uns["vae"]["validation_obs_names"], trained.uns["vae"]["validation_obs_names"])
    np.testing.assert_allclose(_stored_latent(back), trained.obsm["X_vae"], rtol=1e-5, atol=1e-5)


def test_h5ad_round_trip_with_layer_and_batches(sim, tmp_path, fast):
    sim.layers["counts"] = sim.X.copy()
    sc.pp.normalize_total(sim)
    sc.pp.log1p(sim)
    sv.tl.vae(sim, layer="counts", batch_key="batch", encode_covariates=True, **fast)
    sim.write_h5ad(tmp_path / "b.h5ad")
    back = read_h5ad(tmp_path / "b.h5ad")
    assert back.uns["vae"]["params"]["layer"] == "counts"
    assert back.uns["vae"]["params"]["batch_key"] == "batch"
    assert list(back.uns["vae"]["batch_categories"]) == ["batch_0", "batch_1"]
    np.testing.assert_allclose(_stored_latent(back), sim.obsm["X_vae"], rtol=1e-5, atol=1e-5)


def test_get_model_without_model_raises(sim):
    with pytest.raises(KeyError, match="tl.vae"):
        sv.get_model(sim)


# --- minibatch edge cases (the input cases themselves are in test_inputs.py) --------------------


@pytest.mark.parametrize("n", [2, 3, 129, 257, 300])
def test_minibatches_cover_every_cell_once_without_singletons(n):
    X = sp.random(n, 5, density=0.5, format="csr", random_state=0, dtype=np.float32)
    X.data[:] = 1
    idx = np.arange(n)
    mbs = Minibatches(X, idx, log_library=np.zeros(n, np.float32), batch_size=128, shuffle=True,
                      rng=np.random.default_rng(0))
    batches = list(mbs)
    assert len(batches) == len(mbs)
    assert all(len(b.idx) >= 2 for b in batches)
    seen = np.concatenate([b.idx for b in batches])
    np.testing.assert_array_equal(np.sort(seen), idx)
    for b in batches:  # rows are the right rows
        np.testing.assert_array_equal(b.x.numpy(), X[b.idx].toarray())


def test_train_size_one(sim, fast):
    sv.tl.vae(sim, train_size=1.0, **fast)
    uns = sim.uns["vae"]
    assert len(uns["validation_obs_names"]) == 0
    h = uns["history"]
    _assert_history_consistent(h, n_epochs=20)
    assert np.isnan(h["elbo_validation"]).all()
    assert np.isfinite(h["elbo_train"]).all()
    assert np.isfinite(sim.obsm["X_vae"]).all()


def test_dropout_by_data_size(sim, fast, monkeypatch):
    """dropout=None: the small-data rate below SMALL_DATA_CELLS cells, scvi-tools' 0.1 from there; recorded and used."""
    fast.pop("dropout", None)
    sv.tl.vae(sim, **fast)
    assert sim.uns["vae"]["params"]["dropout"] == sc_vi_ext.train.SMALL_DATA_DROPOUT == 0.4
    assert sv.get_model(sim).encoder.net.layers[0][2].p == 0.4  # the module trained and stored with it
    monkeypatch.setattr(sc_vi_ext.train, "SMALL_DATA_CELLS", sim.n_obs)  # the data counts as large
    sv.tl.vae(sim, **fast)
    assert sim.uns["vae"]["params"]["dropout"] == 0.1
    sv.tl.vae(sim, dropout=0.25, **fast)
    assert sim.uns["vae"]["params"]["dropout"] == 0.25


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range_is_refused_before_writing(sim, fast, dropout):
    fast.pop("dropout", None)
    with pytest.raises(ValueError, match="dropout must be in"):
        sv.tl.vae(sim, dropout=dropout, **fast)
    assert "vae" not in sim.uns and "X_vae" not in sim.obsm


# --- model variants --------------------------------------------------------------------------------


def test_single_batch_category(sim, fast):
    sim.obs["one"] = "only"
    sv.tl.vae(sim, batch_key="one", **fast)
    assert list(sim.uns["vae"]["batch_categories"]) == ["only"]
    assert np.isfinite(sim.obsm["X_vae"]).all()
    np.testing.assert_allclose(_stored_latent(sim), sim.obsm["X_vae"], rtol=1e-5, atol=1e-5)


def test_three_batches_gene_batch_dispersion(fast):
    ad = sv.datasets.simulate(200, 60, n_batches=3, random_state=2)
    sv.tl.vae(ad, batch_key="batch", dispersion="gene-batch", encode_covariates=True, **fast)
    uns = ad.uns["vae"]
    assert list(uns["batch_categories"]) == ["batch_0", "batch_1", "batch_2"]
    assert uns["model"]["log_theta"].shape == (3, 60)
    assert np.isfinite(ad.obsm["X_vae"]).all()
    np.testing.assert_allclose(_stored_latent(ad), ad.obsm["X_vae"], rtol=1e-5, atol=1e-5)
    # the encoder sees the batch: relabelling the batches changes the latent means
    flipped = ad.copy()
    flipped.obs["batch"] = flipped.obs["batch"].map(
        {"batch_0": "batch_1", "batch_1": "batch_2", "batch_2": "batch_0"}).astype("category")
    assert not np.allclose(_stored_latent(flipped), ad.obsm["X_vae"], atol=1e-4)


# --- training control ------------------------------------------------------------------------------


def test_early_stopping_stops(sim):
    sv.tl.vae(sim, max_epochs=300, n_hidden=16, early_stopping_patience=1, n_epochs_kl_warmup=2, progress=False)
    uns = sim.uns["vae"]
    assert uns["stopped_early"]
    n = len(uns["history"]["epoch"])
    assert n < 300
    _assert_history_consistent(uns["history"], n_epochs=n)
    # stopping with patience 1 means the last epoch was worse than the best one
    h = uns["history"]["elbo_validation"]
    assert h[-1] <= h[uns["best_epoch"] - 1]


def test_best_epoch_weights_are_restored_not_the_last():
    """After early stopping the stored model (and the latent written with it) is the best epoch's, not the last's.

    (test_best_weights_are_kept cannot tell: the session model's best epoch is its last.)
    """
    adata = sv.datasets.simulate(200, 60, random_state=0)
    sv.tl.vae(adata, max_epochs=100, n_hidden=16, lr=3e-3, early_stopping_patience=2, n_epochs_kl_warmup=2,
              dropout=0.1, progress=False)  # a run whose last epoch is measurably worse than its best
    uns = adata.uns["vae"]
    h, best = uns["history"]["elbo_validation"], uns["best_epoch"]
    assert uns["stopped_early"] and len(h) == best + 2
    assert h[-1] < h[best - 1] - 0.05  # the last epoch is measurably worse: the two can be told apart
    val = adata.obs_names.get_indexer(uns["validation_obs_names"])
    module = sv.get_model(adata)
    elbo = evaluate(module, stored_loader(adata, "vae", val, batch_size=1024), seed=uns["params"]["random_state"])
    assert elbo["elbo"] == pytest.approx(h[best - 1], abs=1e-3)
    np.testing.assert_allclose(_stored_latent(adata), adata.obsm["X_vae"], rtol=1e-5, atol=1e-5)


def test_no_early_stopping_runs_all_epochs(sim):
    sv.tl.vae(sim, max_epochs=30, n_hidden=16, early_stopping=False, n_epochs_kl_warmup=2, progress=False)
    assert not sim.uns["vae"]["stopped_early"]
    assert len(sim.uns["vae"]["history"]["epoch"]) == 30


def test_progress_false_is_silent(sim, capsys):
    sv.tl.vae(sim, max_epochs=3, n_hidden=16, progress=False)
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ""


def test_progress_true_shows_bar(sim, capsys):
    """Positive control for the test above: the bar does write to stderr."""
    sv.tl.vae(sim, max_epochs=3, n_hidden=16, progress=True)
    assert "training VAE" in capsys.readouterr().err
