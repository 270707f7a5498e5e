"""Denoised expression, Bayesian differential expression and the posterior predictive check."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pytest
import scanpy as sc
import torch

import sc_vi_ext as sv
from sc_vi_ext.tl._de import posterior_fdr
from sc_vi_ext.tl._ppc import sample_counts
from sc_vi_ext.tl._shared import STATS

# a larger step size and smaller minibatches than the defaults: a usable fit in 30 quick epochs
TRAIN = {"n_hidden": 32, "max_epochs": 30, "batch_size": 64, "lr": 1e-2, "progress": False, "random_state": 0}
QUIET = {"progress": False}


@pytest.fixture(scope="module")
def trained():
    adata = sv.datasets.simulate(300, 60, n_batches=2, n_types=3, random_state=0)
    sv.tl.vae(adata, batch_key="batch", **TRAIN)
    return adata


@pytest.fixture(scope="module")
def with_de(trained):
    return sv.tl.differential_expression(trained, groupby="cell_type", copy=True, **QUIET)


@pytest.fixture(scope="module")
def with_ppc(trained):
    return sv.tl.posterior_predictive(trained, n_samples=5, copy=True, **QUIET)


# --- normalized_expression -------------------------------------------------------------

def test_normalized_expression_layer(trained):
    out = sv.tl.normalized_expression(trained, copy=True, **QUIET)
    x = out.layers["vae_normalized"]
    assert x.shape == trained.shape and x.dtype == np.float32
    np.testing.assert_allclose(x.sum(1), 1e4, rtol=1e-4)
    rec = out.uns["vae"]["normalized_expression"]["vae_normalized"]
    assert rec["slot"] == "layers" and rec["params"]["n_samples"] == 1
    assert "vae_normalized" not in trained.layers  # copy=True leaves the input alone
    # seeded draws repeat; another seed or the posterior mean give other values
    again = sv.tl.normalized_expression(trained, copy=True, **QUIET).layers["vae_normalized"]
    np.testing.assert_array_equal(x, again)
    other = sv.tl.normalized_expression(trained, random_state=1, copy=True, **QUIET).layers["vae_normalized"]
    assert not np.allclose(x, other)
    mean_a = sv.tl.normalized_expression(trained, n_samples=0, library_size=1.0, copy=True, **QUIET)
    mean_b = sv.tl.normalized_expression(trained, n_samples=0, library_size=1.0, random_state=7, copy=True, **QUIET)
    np.testing.assert_array_equal(mean_a.layers["vae_normalized"], mean_b.layers["vae_normalized"])
    np.testing.assert_allclose(mean_a.layers["vae_normalized"].sum(1), 1.0, rtol=1e-4)


def test_transform_batch(trained):
    kw = {"n_samples": 0, "copy": True, **QUIET}
    own = sv.tl.normalized_expression(trained, **kw).layers["vae_normalized"]
    b0 = sv.tl.normalized_expression(trained, transform_batch="batch_0", **kw).layers["vae_normalized"]
    b1 = sv.tl.normalized_expression(trained, transform_batch="batch_1", **kw).layers["vae_normalized"]
    both = sv.tl.normalized_expression(trained, transform_batch=["batch_0", "batch_1"], **kw).layers["vae_normalized"]
    in0 = (trained.obs["batch"] == "batch_0").to_numpy()
    # decoding with a cell's own batch is the untransformed result; the other batch changes it
    np.testing.assert_allclose(b0[in0], own[in0], rtol=1e-5)
    np.testing.assert_allclose(b1[~in0], own[~in0], rtol=1e-5)
    assert np.abs(np.log(b0[~in0] / own[~in0])).mean() > 0.01
    assert not np.allclose(b0, own)
    np.testing.assert_allclose(both, (b0 + b1) / 2, rtol=1e-4)
    np.testing.assert_allclose(both.sum(1), 1e4, rtol=1e-4)


def test_gene_subset_goes_to_obsm(trained):
    out = sv.tl.normalized_expression(trained, n_samples=3, gene_subset=["gene_5", "gene_2"], layer_added="sub",
                                      copy=True, **QUIET)
    assert "sub" not in out.layers
    sub = out.obsm["sub"]
    assert sub.shape == (trained.n_obs, 2) and sub.dtype == np.float32
    rec = out.uns["vae"]["normalized_expression"]["sub"]
    assert rec["slot"] == "obsm" and list(rec["var_names"]) == ["gene_5", "gene_2"]
    full = sv.tl.normalized_expression(trained, n_samples=3, copy=True, **QUIET).layers["vae_normalized"]
    np.testing.assert_allclose(sub, full[:, [5, 2]], rtol=1e-5)  # same seed, same draws


def test_normalized_expression_errors(trained):
    with pytest.raises(ValueError, match="batch_9"):
        sv.tl.normalized_expression(trained, transform_batch="batch_9", copy=True, **QUIET)
    with pytest.raises(KeyError, match="not_a_gene"):
        sv.tl.normalized_expression(trained, gene_subset=["gene_1", "not_a_gene"], copy=True, **QUIET)
    with pytest.raises(KeyError, match="tl.vae"):
        sv.tl.normalized_expression(trained, key="nope", **QUIET)
    no_batch = sv.datasets.simulate(40, 20, n_batches=1, n_types=2, random_state=1)
    sv.tl.vae(no_batch, n_hidden=8, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="no batch covariate"):
        sv.tl.normalized_expression(no_batch, transform_batch="batch_0", **QUIET)


def test_large_result_warns(trained, monkeypatch):
    import sc_vi_ext.tl._expression as mod

    said = []
    monkeypatch.setattr(mod, "_WARN_BYTES", 10_000)
    monkeypatch.setattr(mod.logg, "warning", lambda msg, **kw: said.append(msg))
    sv.tl.normalized_expression(trained, copy=True, **QUIET)  # 300 x 60 float32: 72,000 bytes
    assert len(said) == 1 and "GiB" in said[0] and "gene_subset" in said[0]
    sv.tl.normalized_expression(trained, gene_subset=["gene_1"], copy=True, **QUIET)  # 1,200 bytes
    assert len(said) == 1
    genes = list(trained.var_names[:10])
    sv.tl.normalized_expression(trained, gene_subset=genes, copy=True, **QUIET)  # 300 x 10: 12,000 bytes
    assert len(said) == 2 and "300 x 10" in said[1] and "GiB" in said[1] and "obsm" in said[1]


# --- differential_expression -------------------------------------------------------------

def test_de_recovers_markers(with_de):
    var = with_de.var
    for group in ("type_0", "type_1", "type_2"):
        df = sc.get.rank_genes_groups_df(with_de, group=group, key="vae_de")
        assert list(df.columns) == ["names", "scores", "logfoldchanges", "pvals", "pvals_adj"]
        assert len(df) == with_de.n_vars
        top = df["names"].to_numpy()[:20]
        assert (var.loc[top, "marker_of"] == group).mean() >= 0.6, group
        assert (df["logfoldchanges"].to_numpy()[:20] > 0).all()
        assert (np.diff(df["scores"].to_numpy()) <= 0).all()  # sorted by score, as scanpy


@pytest.mark.filterwarnings("ignore:Attempting to set identical low and high ylims")  # top scores tie at 1
def test_de_layout_matches_scanpy(with_de):
    res = with_de.uns["vae_de"]
    p = res["params"]
    assert p["groupby"] == "cell_type" and p["reference"] == "rest" and p["method"] == "scvi_change"
    assert p["use_raw"] is False and p["batch_corrected"]
    groups = ("type_0", "type_1", "type_2")
    for field, kind in (("names", "O"), ("scores", "f"), ("logfoldchanges", "f"), ("pvals", "f"),
                        ("pvals_adj", "f"), ("bayes_factor", "f"), ("proba_de", "f"), ("is_de_fdr", "b")):
        arr = res[field]
        assert isinstance(arr, np.recarray) and arr.dtype.names == groups, field
        assert all(arr.dtype[g].kind == kind for g in groups), field
    for g in groups:
        proba, q = res["proba_de"][g], res["pvals_adj"][g]
        assert ((proba >= 0) & (proba <= 1)).all()
        np.testing.assert_allclose(res["pvals"][g], 1 - proba)
        np.testing.assert_allclose(res["bayes_factor"][g], np.log(proba + 1e-8) - np.log(1 - proba + 1e-8))
        np.testing.assert_array_equal(res["is_de_fdr"][g], q <= 0.05)
        # the expected FDR of the reported set really is at most 0.05
        chosen = res["is_de_fdr"][g]
        assert chosen.any() and (1 - proba[chosen]).mean() <= 0.05
    # scanpy's own plot reads the result: one panel per group, naming that group's top genes
    axes = sc.pl.rank_genes_groups(with_de, key="vae_de", n_genes=10, show=False)
    assert [a.get_title() for a in axes] == [f"{g} vs. rest" for g in groups]
    for ax, g in zip(axes, groups, strict=True):
        assert [t.get_text() for t in ax.texts] == list(res["names"][g][:10])


def test_posterior_fdr_with_ties():
    p = np.array([0.99, 0.5, 0.99, 0.9, 0.9, 0.2])
    q = posterior_fdr(p)
    np.testing.assert_allclose(q[[0, 2]], 0.01)  # a tie shares the value of the whole tie
    np.testing.assert_allclose(q[[3, 4]], (0.01 * 2 + 0.1 * 2) / 4)
    np.testing.assert_allclose(q[1], (0.02 + 0.2 + 0.5) / 5)
    np.testing.assert_allclose(q.max(), q[5])


def test_de_reference_vanilla_and_errors(trained):
    out = sv.tl.differential_expression(trained, groupby="cell_type", groups=["type_0", "type_1"],
                                        reference="type_1", mode="vanilla", n_samples=50, key_added="v",
                                        n_cells_per_group=20,  # fewer cells than draws: several z per cell
                                        copy=True, **QUIET)
    res = out.uns["v"]
    assert res["names"].dtype.names == ("type_0",)  # the reference is not tested against itself
    assert res["params"]["method"] == "scvi_vanilla" and res["params"]["reference"] == "type_1"
    df = sc.get.rank_genes_groups_df(out, group="type_0", key="v")
    top = df["names"].to_numpy()[:10]
    assert (out.var.loc[top, "marker_of"] == "type_0").mean() >= 0.6
    proba = res["proba_de"]["type_0"]
    np.testing.assert_allclose(res["pvals"]["type_0"], 1 - np.maximum(proba, 1 - proba))
    with pytest.raises(ValueError, match="mode"):
        sv.tl.differential_expression(trained, groupby="cell_type", mode="fancy")
    with pytest.raises(ValueError, match="type_9"):
        sv.tl.differential_expression(trained, groupby="cell_type", groups=["type_9"])
    with pytest.raises(ValueError, match="reference"):
        sv.tl.differential_expression(trained, groupby="cell_type", reference="type_9")
    with pytest.raises(KeyError, match="nope"):
        sv.tl.differential_expression(trained, groupby="nope")


# --- posterior_predictive ----------------------------------------------------------------

def test_sample_counts_moments():
    torch.manual_seed(0)

    class M:
        likelihood = "zinb"

    mu = torch.full((20000, 3), 4.0)
    theta = torch.tensor([0.5, 2.0, 50.0])
    zi = torch.full((20000, 3), -1.0)  # dropout probability sigmoid(-1) = 0.269
    x = sample_counts(M, {"mu": mu, "theta": theta, "zi_logits": zi})
    pi = torch.sigmoid(torch.tensor(-1.0))
    np.testing.assert_allclose(x.mean(0), (1 - pi) * 4.0, rtol=0.05)
    nb_zero = (theta / (theta + 4.0)) ** theta
    np.testing.assert_allclose((x == 0).float().mean(0), pi + (1 - pi) * nb_zero, atol=0.015)
    M.likelihood = "nb"
    x = sample_counts(M, {"mu": mu, "theta": theta, "zi_logits": None})
    np.testing.assert_allclose(x.var(0), 4.0 + 16.0 / theta, rtol=0.1)


def test_posterior_predictive_columns(with_ppc, trained):
    var = with_ppc.var
    for s in STATS:
        for suffix in ("obs", "pred", "pred_sd"):
            assert f"vae_ppc_{s}_{suffix}" in var
    x = trained.X.toarray().astype(np.float64)
    np.testing.assert_allclose(var["vae_ppc_mean_obs"], x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var["vae_ppc_var_obs"], x.var(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(var["vae_ppc_frac_zero_obs"], (x == 0).mean(0))
    obs, pred = var["vae_ppc_mean_obs"].to_numpy(), var["vae_ppc_mean_pred"].to_numpy()
    assert np.corrcoef(np.log(obs), np.log(pred))[0, 1] > 0.9
    assert (var["vae_ppc_mean_pred_sd"] > 0).all()
    summary = with_ppc.uns["vae"]["posterior_predictive"]["summary"]
    assert set(summary) == set(STATS)
    assert 0 <= summary["mean"]["mean_abs_log_ratio"] < 0.5
    assert not any(c.startswith("vae_ppc") for c in trained.var)  # copy=True


def _ppc_points(ax) -> dict[str, np.ndarray]:
    """The scatter points of a posterior predictive panel, by legend label."""
    return {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections if c.get_label() in
            ("within 3 sd", "off by > 3 sd")}


def _assert_panel_draws(ax, var, stat):
    """One point per gene at (observed, predicted), those more than 3 sd off drawn apart."""
    o, p, sd = (var[f"vae_ppc_{stat}_{s}"].to_numpy(float) for s in ("obs", "pred", "pred_sd"))
    keep = np.isfinite(o) & np.isfinite(p) & ((o > 0) & (p > 0) if stat != "frac_zero" else True)
    off = np.abs(o - p) > 3 * sd
    pts = _ppc_points(ax)
    np.testing.assert_array_equal(pts["within 3 sd"], np.c_[o, p][keep & ~off])
    np.testing.assert_array_equal(pts["off by > 3 sd"], np.c_[o, p][keep & off])
    assert keep.sum() >= 0.9 * len(o)  # (nearly) every gene is drawn


def test_posterior_predictive_plot(with_ppc, tmp_path):
    axes = sv.pl.posterior_predictive(with_ppc, show=False)
    assert len(axes) == len(STATS) and all(isinstance(a, plt.Axes) for a in axes)
    assert axes[0].get_xscale() == "log" and axes[-1].get_xscale() == "linear"
    for ax, stat in zip(axes, STATS, strict=True):
        _assert_panel_draws(ax, with_ppc.var, stat)
        assert ax.get_xlabel().startswith("observed") and ax.get_ylabel().startswith("predicted")
    _, ax = plt.subplots()
    assert sv.pl.posterior_predictive(with_ppc, stats="var", ax=ax, show=False) is ax
    _assert_panel_draws(ax, with_ppc.var, "var")
    fig = sv.pl.posterior_predictive(with_ppc, stats=["mean", "frac_zero"], return_fig=True)
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 2
    fig.savefig(tmp_path / "ppc.png")
    with pytest.raises(ValueError, match="stats"):
        sv.pl.posterior_predictive(with_ppc, stats="median", show=False)
    bare = with_ppc.copy()
    del bare.uns["vae"]["posterior_predictive"]
    with pytest.raises(KeyError, match="posterior_predictive"):
        sv.pl.posterior_predictive(bare, show=False)


@pytest.mark.parametrize("options", [
    {"likelihood": "poisson", "library": "latent", "latent_distribution": "ln"},
    {"likelihood": "nb", "dispersion": "gene-cell", "n_layers": 2},
    {"dispersion": "gene-batch", "encode_covariates": True, "categorical_covariate_keys": ["cell_type"]},
])
def test_every_model_option_runs(options):
    adata = sv.datasets.simulate(60, 20, n_batches=2, n_types=2, n_markers=4, random_state=2)
    sv.tl.vae(adata, batch_key="batch", n_hidden=8, max_epochs=2, progress=False, **options)
    sv.tl.normalized_expression(adata, transform_batch="batch_1", n_samples=2, **QUIET)
    np.testing.assert_allclose(adata.layers["vae_normalized"].sum(1), 1e4, rtol=1e-4)
    sv.tl.differential_expression(adata, groupby="cell_type", n_samples=20, **QUIET)
    assert adata.uns["vae_de"]["names"].dtype.names == ("type_0", "type_1")
    sv.tl.posterior_predictive(adata, n_samples=2, **QUIET)
    assert np.isfinite(adata.var["vae_ppc_mean_pred"]).all()


# --- persistence ---------------------------------------------------------------------------

def test_h5ad_round_trip(with_de, tmp_path):
    adata = with_de.copy()
    sv.tl.normalized_expression(adata, transform_batch="batch_0", **QUIET)
    sv.tl.normalized_expression(adata, gene_subset=["gene_1", "gene_3"], layer_added="sub", **QUIET)
    sv.tl.posterior_predictive(adata, n_samples=2, **QUIET)
    adata.write_h5ad(tmp_path / "x.h5ad")
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    np.testing.assert_array_equal(back.layers["vae_normalized"], adata.layers["vae_normalized"])
    np.testing.assert_array_equal(back.obsm["sub"], adata.obsm["sub"])
    assert list(back.uns["vae"]["normalized_expression"]["sub"]["var_names"]) == ["gene_1", "gene_3"]
    for field in ("names", "scores", "pvals_adj", "is_de_fdr"):
        np.testing.assert_array_equal(back.uns["vae_de"][field]["type_0"], adata.uns["vae_de"][field]["type_0"])
    a = sc.get.rank_genes_groups_df(adata, group="type_0", key="vae_de")
    b = sc.get.rank_genes_groups_df(back, group="type_0", key="vae_de")
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    cols = [c for c in adata.var if c.startswith("vae_ppc")]
    np.testing.assert_array_equal(back.var[cols].to_numpy(), adata.var[cols].to_numpy())
    assert len(sv.pl.posterior_predictive(back, show=False)) == len(STATS)
    # the model itself survives too: the same seed gives the same expression
    again = sv.tl.normalized_expression(back, transform_batch="batch_0", copy=True, **QUIET)
    np.testing.assert_allclose(again.layers["vae_normalized"], adata.layers["vae_normalized"], rtol=1e-6)
