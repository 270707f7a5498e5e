"""Bad and unusual input, in one place: every case either raises a helpful error and leaves the
AnnData exactly as it was, or gives the right result.

Sections: count values (tl.vae), accepted formats and shapes, training failures (divergence,
Ctrl-C), stored models and their genes (every tool that applies one), subsets, damaged models,
query mapping and retraining. README.md, "Bad input", lists the same cases.
"""

from __future__ import annotations

import io

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import sc_vi_ext as sv
import sc_vi_ext.train
from sc_vi_ext.inputs import COUNT_RTOL, inspect_counts
from sc_vi_ext.train import TrainingDivergedError, TrainingInterrupted, evaluate


def _snapshot(adata):
    X = adata.X
    X = X.toarray() if sp.issparse(X) else np.array(X, copy=True)
    return {
        "shape": adata.shape,
        "obsm": sorted(adata.obsm),
        "uns": sorted(adata.uns),
        "layers": sorted(k for k in adata.layers if k is not None),
        "obs": list(adata.obs.columns),
        "var": list(adata.var.columns),
        "uns_vae": sorted(adata.uns["vae"]) if "vae" in adata.uns else None,
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


def _off_by_1e4(ad, fmt):  # one value 1e-4 from an integer: far above float noise
    _set(ad, fmt, 3, 4, 2.0001)


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
    "off-by-1e-4": (_off_by_1e4, r"non-integer values.*normalised or log-transformed"),
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


def test_bad_values_in_backed_file(sim, tmp_path):
    _negative(sim, "csr")
    sim.write_h5ad(tmp_path / "bad.h5ad")
    backed = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    with pytest.raises(ValueError, match="negative values"):
        sv.tl.vae(backed, max_epochs=2, progress=False)
    assert "X_vae" not in backed.obsm and "vae" not in backed.uns


# --- counts stored as floats with rounding noise ------------------------------------------------


def _float64_noise(X):  # as a CSV written by pandas holds them: within 1e-11 of the integers
    X = X.toarray().astype(np.float64)
    noise = np.random.default_rng(0).uniform(-1e-11, 1e-11, X.shape)
    return X + noise  # zeros too: 1e-12 where there was no count


def _float32_arithmetic(X):  # normalised to proportions and back, in float32: a few ULPs off
    X = X.toarray().astype(np.float32)
    s = X.sum(1, keepdims=True)
    return sp.csr_matrix((X / s) * s)


NEAR_INTEGER = {"float64-csv-noise": _float64_noise, "float32-round-trip": _float32_arithmetic}


@pytest.mark.parametrize("case", list(NEAR_INTEGER))
def test_near_integer_floats_train_as_rounded_counts(case, sim, trained_session, fast):
    sim.X = NEAR_INTEGER[case](sim.X)
    vals = sim.X.data if sp.issparse(sim.X) else sim.X
    assert (vals != np.rint(vals)).any()  # the case under test really happened
    before = sim.X.copy()
    out = sv.tl.vae(sim, copy=True, **fast)
    # the rounded counts are what trains: the same latent space as the integer counts
    np.testing.assert_allclose(out.obsm["X_vae"], trained_session.obsm["X_vae"], rtol=1e-5, atol=1e-5)
    rec = out.uns["vae"]["counts_rounded"]
    assert rec["n_values"] == int((vals != np.rint(vals)).sum())
    assert rec["max_deviation"] == pytest.approx(np.abs(vals - np.rint(vals)).max())
    after = sim.X.data if sp.issparse(sim.X) else sim.X  # the AnnData is not modified
    np.testing.assert_array_equal(after, before.data if sp.issparse(before) else before)


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        ([0.99999999999, 3.0000000001, 0.0], True),  # float64 text noise
        ([1 + 4e-7, 7.0], True),  # float32 noise: a few units of 1.2e-7
        ([1e6 * (1 + 5e-7)], True),  # relative: 0.5 off at a million is float32 noise
        ([1e-7, 2.0], True),  # absolute floor below 1
        ([1 + 3e-6, 7.0], False),
        ([1e5 + 0.5], False),  # 0.5 off at 100,000 is 5e-6 relative
        ([0.5, 2.0], False),
        (list(np.log1p([1.0, 2.0, 3.0])), False),
    ],
    ids=["float64-noise", "float32-noise", "relative-large", "absolute-small", "3e-6-off", "0.5-off-at-1e5",
         "half", "log1p"],
)
def test_count_tolerance_both_sides(values, ok):
    X = np.array([values + [1.0]])
    if ok:
        res = inspect_counts(X, "X")
        dev = np.abs(X - np.rint(X))
        assert res.n_rounded == int((dev > 0).sum()) and res.max_deviation == pytest.approx(dev.max())
        assert res.totals[0] == np.rint(X).sum()
    else:
        with pytest.raises(ValueError, match="non-integer values"):
            inspect_counts(X, "X")


def test_tolerance_covers_float32_and_float64_round_trips():
    """The tolerance is decided from what normalising and scaling back leaves: float64 about
    1e-16 relative, float32 a few 1e-8 to 1e-7; both well inside COUNT_RTOL."""
    counts = sv.datasets.pbmc68k().layers["counts"].toarray()
    for dtype, limit in ((np.float64, 1e-14), (np.float32, COUNT_RTOL / 2)):
        x = counts.astype(dtype)
        s = x.sum(1, keepdims=True)
        back = (x / s * np.asarray(1e4, dtype)) / np.asarray(1e4, dtype) * s
        rel = np.abs(back - counts) / np.maximum(1, counts)
        assert 0 < rel.max() < limit


def test_real_counts_through_csv_and_pandas_train(tmp_path, scanpy_log):
    """A real public count matrix (PBMC, 10x) written as floats with noise and read back by pandas."""
    pbmc = sv.datasets.pbmc68k()[:300]
    counts = pbmc.layers["counts"].toarray().astype(np.float64)
    noisy = counts * 0.1 * 10  # float arithmetic: 3 * 0.1 * 10 is 3.0000000000000004
    noisy[noisy > 0] += np.random.default_rng(0).uniform(-1e-11, 1e-11, int((noisy > 0).sum()))
    pd.DataFrame(noisy, index=pbmc.obs_names, columns=pbmc.var_names).to_csv(tmp_path / "counts.csv")
    df = pd.read_csv(tmp_path / "counts.csv", index_col=0)
    adata = ad.AnnData(df)
    assert adata.X.dtype == np.float64 and (adata.X != np.rint(adata.X)).sum() > 1000
    sv.tl.vae(adata, max_epochs=3, n_hidden=16, progress=False)
    assert np.isfinite(adata.obsm["X_vae"]).all()
    assert adata.uns["vae"]["counts_rounded"]["n_values"] == int((adata.X != np.rint(adata.X)).sum())
    assert adata.uns["vae"]["counts_rounded"]["max_deviation"] < 1e-10
    n = adata.uns["vae"]["counts_rounded"]["n_values"]
    assert f"rounded {n} value(s) of adata.X" in scanpy_log.getvalue()  # and said so
    sc.pp.neighbors(adata, use_rep="X_vae")  # the result is usable downstream


# --- accepted formats and shapes ---------------------------------------------------------------

FORMATS = {
    "dense-float32": lambda X: X.toarray(),
    "dense-int64": lambda X: X.toarray().astype(np.int64),
    "csr-int32": lambda X: sp.csr_matrix(X.astype(np.int32)),
    "csc-float32": lambda X: sp.csc_matrix(X),
    "csc-float64": lambda X: sp.csc_matrix(X.astype(np.float64)),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_matrix_formats_give_same_latent(fmt, sim, trained_session, fast):
    """The reference is CSR float32 (the simulator's format); every format gives its latent."""
    sim.X = FORMATS[fmt](sim.X)
    out = sv.tl.vae(sim, copy=True, **fast)
    np.testing.assert_allclose(out.obsm["X_vae"], trained_session.obsm["X_vae"], rtol=1e-5, atol=1e-5)


def test_view_trains_and_leaves_parent_alone(sim, trained_session, fast):
    view = sim[sim.obs_names]  # every cell, as a view
    assert view.is_view
    with pytest.warns(ad.ImplicitModificationWarning):  # anndata's notice: the view becomes an AnnData
        sv.tl.vae(view, **fast)
    np.testing.assert_allclose(view.obsm["X_vae"], trained_session.obsm["X_vae"], rtol=1e-5, atol=1e-5)
    assert "X_vae" not in sim.obsm and "vae" not in sim.uns


def test_layer_is_used(sim, trained_session, fast):
    """Counts in a layer with log-normalised X give the same latent as counts in X."""
    sim.layers["counts"] = sim.X.copy()
    sc.pp.normalize_total(sim)
    sc.pp.log1p(sim)
    out = sv.tl.vae(sim, layer="counts", copy=True, **fast)
    np.testing.assert_allclose(out.obsm["X_vae"], trained_session.obsm["X_vae"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("n_obs", "train_size", "batch_size"),
    [(129, 1.0, 128), (143, 0.9, 128), (34, 0.5, 8), (40, 0.9, 128)],
    ids=["129-train-cells-no-val", "129-train-cells-with-val", "17-train-cells-bs8", "fewer-cells-than-batch"],
)
def test_small_data_and_last_minibatch_of_one_cell(n_obs, train_size, batch_size, sim_session):
    adata = sim_session[:n_obs].copy()
    out = sv.tl.vae(adata, train_size=train_size, batch_size=batch_size, max_epochs=3, n_hidden=16,
                    progress=False, copy=True)
    n_train = n_obs - len(out.uns["vae"]["validation_obs_names"])
    assert n_train % batch_size == 1 or n_train < batch_size  # the case under test really happened
    assert out.obsm["X_vae"].shape == (n_obs, 10)
    assert np.isfinite(out.obsm["X_vae"]).all()
    assert np.isfinite(out.uns["vae"]["history"]["elbo_train"]).all()


# --- training failures: divergence and Ctrl-C ----------------------------------------------------


@pytest.mark.parametrize("copy", [False, True], ids=["in-place", "copy"])
def test_divergence_raises_and_writes_nothing(copy, sim, fast):
    snap = _snapshot(sim)
    with pytest.raises(TrainingDivergedError, match=r"NaN or infinite in epoch \d+ \(learning rate 10\).*smaller"):
        sv.tl.vae(sim, **{**fast, "lr": 10.0}, copy=copy)
    _assert_unchanged(sim, snap)


def test_nan_latent_is_never_written(sim, fast, monkeypatch):
    import sc_vi_ext.tl._vae as vae_module

    monkeypatch.setattr(vae_module, "latent_means", lambda module, loader: np.full((sim.n_obs, 10), np.nan))
    snap = _snapshot(sim)
    with pytest.raises(TrainingDivergedError):
        sv.tl.vae(sim, **fast)
    _assert_unchanged(sim, snap)


def _interrupt_optimiser(monkeypatch):
    def adam(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sc_vi_ext.train.torch.optim, "Adam", adam)


def _interrupt_evaluation(call):
    def patch(monkeypatch):
        calls = {"n": 0}

        def interrupting_evaluate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt
            return evaluate(*args, **kwargs)

        monkeypatch.setattr(sc_vi_ext.train, "evaluate", interrupting_evaluate)

    return patch


@pytest.mark.parametrize("when", ["optimiser-setup", "epoch-1"])
def test_ctrl_c_before_first_epoch_writes_nothing(when, sim, fast, monkeypatch):
    {"optimiser-setup": _interrupt_optimiser, "epoch-1": _interrupt_evaluation(1)}[when](monkeypatch)
    snap = _snapshot(sim)
    with pytest.raises(TrainingInterrupted, match="before the first epoch.*nothing was written"):
        sv.tl.vae(sim, **fast)
    _assert_unchanged(sim, snap)
    assert issubclass(TrainingInterrupted, KeyboardInterrupt)  # scripts still stop on Ctrl-C


def test_ctrl_c_later_keeps_best_epoch(sim, fast, monkeypatch):
    _interrupt_evaluation(3)(monkeypatch)
    kept = r"interrupted after 2 epoch\(s\); keeping the best weights so far \(epoch 2\)"
    with pytest.warns(UserWarning, match=kept):
        sv.tl.vae(sim, **fast)
    uns = sim.uns["vae"]
    assert uns["interrupted"] is True and not uns["stopped_early"]
    assert len(uns["history"]["epoch"]) == 2 and uns["best_epoch"] == 2  # still in the warm-up: the latest
    assert np.isfinite(sim.obsm["X_vae"]).all()


# --- stored models and their genes: every tool that applies one -----------------------------------

GAP = {"n_samples": 20, "n_samples_elbo": 16, "max_steps": 20, "progress": False}
TOOLS = {
    "log_likelihood": (lambda a: sv.tl.log_likelihood(a, n_samples=20, progress=False),
                       lambda a: a.obs["vae_log_px"].to_numpy()),
    "refine": (lambda a: sv.tl.refine(a, max_steps=20, n_samples_elbo=8, progress=False),
               lambda a: a.obsm["X_vae_refined"]),
    "amortization_gap": (lambda a: sv.tl.amortization_gap(a, n_cells=None, **GAP),
                         lambda a: a.obs["vae_elbo"].to_numpy()),
    "normalized_expression": (lambda a: sv.tl.normalized_expression(a, n_samples=0, progress=False),
                              lambda a: a.to_df("vae_normalized").sort_index(axis=1).to_numpy()),
    "differential_expression": (
        lambda a: sv.tl.differential_expression(a, groupby="cell_type", n_samples=30, progress=False),
        lambda a: sc.get.rank_genes_groups_df(a, group=None, key="vae_de").sort_values(["group", "names"])[
            ["scores", "logfoldchanges"]].to_numpy()),
    "posterior_predictive": (lambda a: sv.tl.posterior_predictive(a, n_samples=2, progress=False),
                             lambda a: a.var.sort_index()["vae_ppc_mean_pred"].to_numpy()),
}


@pytest.fixture(scope="module")
def applied(trained_session):
    """Each tool's result on the AnnData the model was trained on."""
    out = {}
    for name, (run, result) in TOOLS.items():
        a = trained_session.copy()
        run(a)
        out[name] = result(a)
    return out


@pytest.mark.parametrize("tool", list(TOOLS))
def test_genes_in_another_order_are_aligned_by_name(tool, trained, applied):
    run, result = TOOLS[tool]
    permuted = trained[:, trained.var_names[::-1]].copy()
    run(permuted)
    np.testing.assert_allclose(result(permuted), applied[tool], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tool", list(TOOLS))
def test_other_genes_are_refused(tool, trained):
    trained.var_names = [f"other_{i}" for i in range(trained.n_vars)]  # same number of genes
    snap = _snapshot(trained)
    with pytest.raises(ValueError, match=r"60 of the 60 genes of the model.*not in adata\.var_names.*tl\.vae_map"):
        TOOLS[tool][0](trained)
    _assert_unchanged(trained, snap)


def test_extra_genes_are_ignored(sim, fast):
    model = sim[:, :50].copy()
    sv.tl.vae(model, **fast)
    full = sim.copy()
    full.uns["vae"] = model.uns["vae"]
    sv.tl.log_likelihood(model, n_samples=20, progress=False)
    sv.tl.log_likelihood(full, n_samples=20, progress=False)
    np.testing.assert_allclose(full.obs["vae_log_px"], model.obs["vae_log_px"], rtol=1e-5)
    with pytest.raises(ValueError, match="gene_subset"):  # a layer needs every gene of adata
        sv.tl.normalized_expression(full, progress=False)


def test_models_without_gene_names_match_by_count(trained, applied):
    del trained.uns["vae"]["var_names"]  # as stored by an older version
    with pytest.warns(UserWarning, match="no gene names"):
        TOOLS["log_likelihood"][0](trained)
    np.testing.assert_allclose(TOOLS["log_likelihood"][1](trained), applied["log_likelihood"], rtol=1e-5)


# --- subsets of the AnnData ------------------------------------------------------------------------


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_runs_on_a_subset(tool, trained):
    sub = trained[:50].copy()
    TOOLS[tool][0](sub)
    res = TOOLS[tool][1](sub)
    n_types = sub.obs["cell_type"].nunique()
    n_rows = {"differential_expression": n_types * 60, "posterior_predictive": 60}.get(tool, 50)
    assert len(res) == n_rows and np.isfinite(res).all()


def test_held_out_cells_are_found_by_name_in_a_subset(trained):
    held_out = set(trained.uns["vae"]["validation_obs_names"])
    sub = trained[::-1][:80].copy()  # other positions, other order
    n_val = sum(c in held_out for c in sub.obs_names)
    assert 0 < n_val < 80
    sv.tl.amortization_gap(sub, n_cells=None, **GAP)
    res = sub.uns["vae"]["amortization_gap"]
    assert res["validation"]["n_cells"] == n_val and res["train"]["n_cells"] == 80 - n_val


def test_old_positions_that_do_not_fit_are_refused_before_writing(trained):
    uns = trained.uns["vae"]
    uns["validation_indices"] = trained.obs_names.get_indexer(uns.pop("validation_obs_names"))  # an old model
    sub = trained[:50].copy()
    snap = _snapshot(sub)
    with pytest.raises(ValueError, match="positions.*retrain"):
        sv.tl.amortization_gap(sub, n_cells=None, **GAP)
    _assert_unchanged(sub, snap)


# --- damaged stored models ------------------------------------------------------------------------


def _damage(case):
    def nan(u):
        u["model"]["log_theta"] = np.full_like(u["model"]["log_theta"], np.nan)

    return {
        "missing-weights": lambda u: u["model"].pop("log_theta"),
        "wrong-shape": lambda u: u["model"].__setitem__("log_theta", np.zeros((3, 3), np.float32)),
        "strings": lambda u: u["model"].__setitem__("log_theta", np.array(["x"] * 60)),
        "nan-weights": nan,
        "not-a-mapping": lambda u: u.__setitem__("model", "weights"),
        "no-gene-count": lambda u: u["params"].pop("n_genes"),
        "gene-names-length": lambda u: u.__setitem__("var_names", u["var_names"][:10]),
    }[case]


@pytest.mark.parametrize("case", ["missing-weights", "wrong-shape", "strings", "nan-weights", "not-a-mapping",
                                  "no-gene-count", "gene-names-length"])
def test_damaged_model_is_refused_on_load(case, trained):
    _damage(case)(trained.uns["vae"])
    match = r"model stored in adata\.uns\['vae'\]\['model'\] is damaged.*retrain it with sv\.tl\.vae"
    with pytest.raises(ValueError, match=match):
        sv.get_model(trained)
    snap = _snapshot(trained)
    with pytest.raises(ValueError, match=match):
        sv.tl.log_likelihood(trained, n_samples=5, progress=False)
    _assert_unchanged(trained, snap)


# --- query mapping -----------------------------------------------------------------------------------


def test_vae_map_with_duplicate_gene_names(trained_session, sim):
    names = list(sim.var_names)
    names[1] = names[0]
    sim.var_names = names
    snap = _snapshot(sim)
    with pytest.raises(ValueError, match=r"not unique.*var_names_make_unique\(\)"):
        sv.tl.vae_map(sim, reference=trained_session, progress=False)
    _assert_unchanged(sim, snap)


# --- retraining under an existing key ------------------------------------------------------------------


@pytest.fixture
def scanpy_log():
    """What scanpy logs (warnings and info) during the test."""
    old, verbosity = sc.settings.logfile, sc.settings.verbosity
    buf = io.StringIO()
    sc.settings.logfile, sc.settings.verbosity = buf, 3
    yield buf
    sc.settings.logfile, sc.settings.verbosity = old, verbosity


def test_retraining_removes_results_of_the_old_model(trained, fast, scanpy_log):
    for run, _ in TOOLS.values():
        run(trained)
    trained.obs["vae_cluster"] = "a"  # the user's own column, not a result of the model
    trained.obs["other_log_px"] = 0.0  # another model's result
    derived = {"obs": ["vae_elbo", "vae_log_px", "vae_amortization_gap_se", "vae_refine_gain", "vae_log_px_ess"],
               "obsm": ["X_vae_refined"], "layers": ["vae_normalized"], "var": ["vae_ppc_mean_obs"],
               "uns": ["vae_de"]}
    for attr, names in derived.items():
        assert set(names) <= set(getattr(trained, attr).keys())
    sv.tl.vae(trained, **{**fast, "max_epochs": 2})
    for attr, names in derived.items():
        assert not set(names) & set(getattr(trained, attr).keys()), attr
    assert not any(c.startswith("vae_ppc") for c in trained.var)
    assert {"vae_cluster", "other_log_px"} <= set(trained.obs)
    log = scanpy_log.getvalue()
    assert "removed the results derived from the old one" in log and "'vae_amortization_gap'" in log
    assert "'vae_de'" in log and "'X_vae_refined'" in log
