"""Reference coverage: a cell type the reference lacks is flagged, typical reference cells are not.

A small easy simulation (4 types with strong markers, 2 batches): the reference holds batch 0
without type_3, the query is batch 1 with every type, mapped with ``tl.vae_map`` (a new batch).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

import sc_vi_ext as sv
from sc_vi_ext.diagnostics.coverage import COMPONENTS, EXTRA, GROUP, LOCAL, SHARED, WEIGHTS, combine, tail_pvalue
from sc_vi_ext.diagnostics.coverage_local import (
    abundance,
    baseline,
    bh_adjust,
    local_excess,
    neighbourhood_statistic,
    neighbourhoods,
    noise_variances,
)
from sc_vi_ext.model_store import held_out_mask
from sc_vi_ext.tl._coverage_parts import combined_components

FAST_COV = {"n_scale_cells": 200, "max_steps": 10, "progress": False}


@pytest.fixture(scope="module")
def mapped():
    adata = sv.datasets.simulate(1200, 120, n_batches=2, n_types=4, n_markers=10, random_state=2)
    ref = adata[(adata.obs["batch"] == "batch_0") & (adata.obs["cell_type"] != "type_3")].copy()
    query = adata[adata.obs["batch"] == "batch_1"].copy()
    sv.tl.vae(ref, batch_key="batch", train_size=0.75, max_epochs=60, n_hidden=64, progress=False)
    sv.tl.vae_map(query, reference=ref, max_epochs=20, progress=False)
    return ref, query


@pytest.fixture(scope="module")
def scored(mapped):
    ref, query = mapped
    return sv.tl.reference_coverage(query, reference=ref, copy=True, **FAST_COV)


def test_novel_type_gets_low_coverage(scored):
    obs = scored.obs
    novel = (obs["cell_type"] == "type_3").to_numpy()
    cov = obs["vae_coverage"].to_numpy()
    assert roc_auc_score(novel, -cov) > 0.9
    assert np.median(cov[novel]) < np.median(cov[~novel])
    flag = obs["vae_uncovered"].to_numpy()
    assert flag.dtype == bool
    assert flag[novel].mean() > 0.5 and flag[~novel].mean() < 0.1
    for col in ("vae_coverage", "vae_programme", "vae_model_miss", "vae_latent_novelty", "vae_encoder_miss",
                "vae_latent_density", "vae_neighbourhood", "vae_neighbourhood_fdr", "vae_programme_p",
                "vae_latent_novelty_p", "vae_neighbourhood_p", "vae_abundance", "vae_abundance_p", "vae_common_shift",
                "vae_common_shift_p"):
        assert np.isfinite(obs[col].to_numpy()).all(), col
    assert ((cov > 0) & (cov <= 1)).all()


def test_summaries_and_driving_genes(scored):
    res = scored.uns["vae"]["coverage"]
    assert res["threshold"] == 0.05 and res["groupby"] == "batch"
    assert res["calibration"]["cells"] == "held-out cells of the reference"
    assert res["calibration"]["frac_flagged"] <= 0.1
    assert set(res["groups"]) == {"batch_1"}
    flag = scored.obs["vae_uncovered"].to_numpy()
    top = res["top_genes"]
    assert isinstance(top, pd.DataFrame) and list(top.index) == list(scored.obs_names[flag])
    # the type the reference lacks is named by its own marker genes
    markers = set(scored.var_names[scored.var["marker_of"] == "type_3"])
    novel_flagged = top.index[scored.obs.loc[top.index, "cell_type"] == "type_3"]
    hits = np.isin(top.loc[novel_flagged].to_numpy(), list(markers)).mean()
    assert hits > 0.5
    assert len(set(res["groups"]["batch_1"]["top_genes"][:5]) & markers) >= 3
    assert len(res["groups"]["batch_1"]["top_genes"]) == 20 == len(res["groups"]["batch_1"]["top_genes_shift"])
    assert res["components"] == list(COMPONENTS + GROUP)
    genes = scored.obs["vae_coverage_genes"]
    assert (genes[~flag] == "").all() and (genes[flag] != "").all()


def test_on_the_reference_itself(mapped):
    ref, _ = mapped
    out = sv.tl.reference_coverage(ref, reference=ref, copy=True, **FAST_COV)
    val = held_out_mask(out, "vae")
    assert out.obs["vae_uncovered"].to_numpy()[val].mean() <= 0.1
    assert out.obs["vae_uncovered"].mean() <= 0.1
    assert np.isfinite(out.obs["vae_coverage"]).all()
    assert "vae_coverage" not in ref.obs  # copy=True leaves the input alone


def test_bad_inputs_raise_before_writing(mapped, trained):
    ref, query = mapped
    q = query.copy()
    with pytest.raises(KeyError, match="No trained model"):
        sv.tl.reference_coverage(sv.datasets.simulate(50, 20), reference=ref, progress=False)
    q_missing = q[:, q.var_names[3:]].copy()
    with pytest.raises(ValueError, match="not in adata.var_names"):
        sv.tl.reference_coverage(q_missing, reference=ref, progress=False)
    assert "vae_coverage" not in q_missing.obs and "coverage" not in q_missing.uns["vae"]
    no_val = ref.copy()
    no_val.uns["vae"]["validation_obs_names"] = np.array([], dtype=object)
    with pytest.raises(ValueError, match="held-out cells"):
        sv.tl.reference_coverage(q, reference=no_val, progress=False)
    with pytest.raises(ValueError, match="not the reference"):
        sv.tl.reference_coverage(trained, reference=ref, progress=False)
    with pytest.raises(KeyError, match="groupby"):
        sv.tl.reference_coverage(q, reference=ref, groupby="nope", progress=False)
    with pytest.raises(ValueError, match="alpha"):
        sv.tl.reference_coverage(q, reference=ref, alpha=1.5, progress=False)
    with pytest.raises(KeyError, match="labels_key"):
        sv.tl.reference_coverage(q, reference=ref, labels_key="nope", progress=False)
    with pytest.raises(ValueError, match="n_local"):
        sv.tl.reference_coverage(q, reference=ref, n_local=1, progress=False)
    assert "vae_coverage" not in q.obs and "coverage" not in q.uns["vae"]


def test_trust_no_longer_trusts_uncovered_cells(scored):
    q = scored.copy()
    sv.tl.trust_score(q, progress=False)
    flag = q.obs["vae_uncovered"].to_numpy()
    assert q.obs["vae_untrusted"].to_numpy()[flag].all()
    assert (q.obs["vae_trust"] <= q.obs["vae_coverage"] + 1e-12).all()
    assert "vae_trust_encoder" in q.obs and "vae_untrusted_encoder" in q.obs
    assert q.uns["vae"]["trust"]["uses_coverage"]


def test_tail_pvalue_is_calibrated_and_resolved():
    rng = np.random.default_rng(0)
    ref, new = rng.normal(size=2000), rng.normal(size=20000)
    p = tail_pvalue(ref, new)
    for a in (0.01, 0.05, 0.2):
        assert abs((p < a).mean() - a) < 0.5 * a + 0.005
    far = tail_pvalue(ref, np.array([ref.max() + 1, ref.max() + 3]))
    assert 0 < far[1] < far[0] < 1 / 2001  # beyond the last reference value, still ordered


def test_plot(scored):
    q = scored.copy()
    sc.pp.neighbors(q, use_rep="X_vae")
    sc.tl.umap(q)
    axes = sv.pl.reference_coverage(q, show=False)
    assert len(axes) == 2
    title = axes[1].get_title(loc="left")
    assert title.startswith("The reference does not cover") or title.startswith("The reference covers")
    fig = sv.pl.reference_coverage(q, groupby="cell_type", return_fig=True)
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert labels[-1] == "type_3"  # the most uncovered group on top
    _, ax = plt.subplots()
    assert sv.pl.reference_coverage(q, groupby="cell_type", ax=ax) is ax
    plt.close("all")


def test_new_batch_offset_and_widening_are_not_novelty():
    rng = np.random.default_rng(1)
    n_cal, n = 600, 3000
    cal = {c: rng.normal(size=n_cal) for c in ("a", "b")}
    cells = {c: 2 + 2 * rng.normal(size=n) for c in ("a", "b")}  # the whole new batch shifted and wider
    novel = np.zeros(n, bool)
    novel[:300] = True
    for c in cells:
        cells[c][novel] += 14  # a tenth of it far beyond anything typical
    lib_cal, lib = np.full(n_cal, 7.0), np.full(n, 7.0)
    raw, _, cal_cov = combine(cal, cells, lib_cal, lib)
    assert (raw[~novel] < 0.05).mean() > 0.3  # uncorrected, the batch effect reads as novelty
    cov, _, _ = combine(cal, cells, lib_cal, lib, shift_groups=np.zeros(n, int))
    assert (cov[~novel] < 0.05).mean() < 0.08
    assert (cov[novel] < 0.05).mean() > 0.9
    assert abs((cal_cov < 0.05).mean() - 0.05) < 0.02
    lower = {c: v - 3 for c, v in cal.items()}  # a batch that sits lower is not moved up
    low, _, _ = combine(cal, lower, lib_cal, lib_cal, shift_groups=np.zeros(n_cal, int))
    assert (low < 0.05).mean() < 0.01


def test_labels_add_the_label_uncertainty_component(mapped):
    ref, query = mapped
    out = sv.tl.reference_coverage(query, reference=ref, labels_key="cell_type", copy=True, **FAST_COV)
    assert out.uns["vae"]["coverage"]["components"] == list(COMPONENTS + GROUP)  # reported, not combined
    u = out.obs["vae_label_uncertainty"].to_numpy()
    assert ((u >= 0) & (u < 1)).all() and np.isfinite(out.obs["vae_label_uncertainty_p"]).all()


def test_neighbourhood_statistic_is_standardised_and_sees_a_shared_shift():
    rng = np.random.default_rng(0)
    ref_pos, pos = rng.normal(size=(300, 2)), rng.normal(size=(600, 2))
    ref_res = rng.normal(size=(300, 200)).astype(np.float32)  # unit noise in reference and query residuals
    res = rng.normal(size=(600, 200)).astype(np.float32)
    base = baseline(pos, ref_pos, 30)  # a query twice as dense as the reference: neighbours share baselines
    excess = local_excess(res, ref_res, base)
    s2, t2 = noise_variances(ref_res, ref_pos, excess.var(axis=0), base, 30)
    assert abs(np.median(s2) - 1) < 0.15 and abs(np.median(t2) - 1) < 0.15
    stat = neighbourhood_statistic(excess, neighbourhoods(pos, 30), base, s2, t2)
    assert abs(np.median(stat)) < 0.5 and 0.5 < stat.std() < 2  # about N(0, 1) where nothing is shifted
    # the shared baselines counted: without them (|w|^2 = 0, the noise of each cell's own baseline only),
    # the same cells' statistic runs high
    naive = neighbourhood_statistic(excess, neighbourhoods(pos, 30), base * 0, s2 + t2 / 30, t2)
    assert np.median(naive) > np.median(stat) + 2
    shifted = pos[:, 0] > 1.0  # a region whose cells share a small shift in 20 genes
    excess[np.ix_(shifted, np.arange(20))] += 0.4
    stat = neighbourhood_statistic(excess, neighbourhoods(pos, 30), base, s2, t2)
    assert abs(np.median(stat[pos[:, 0] < -0.5])) < 1.0
    assert np.median(stat[pos[:, 0] > 1.5]) > 2
    p = rng.uniform(size=1000)
    q = bh_adjust(p)
    assert (q >= p).all() and (q <= 1).all()
    assert (np.diff(q[np.argsort(p)]) >= 0).all()  # the adjustment keeps the order of the p-values


def test_extra_evidence_enters_the_coverage_only_on_request(mapped, scored):
    ref, query = mapped
    cal = {c: np.random.default_rng(i).normal(size=300) for i, c in enumerate(("a", "b"))}
    cells = {"a": np.zeros(50), "b": np.full(50, 5.0)}
    lib = np.zeros(300)
    only_a, p, _ = combine(cal, cells, lib, np.zeros(50), combined=("a",))
    both, _, _ = combine(cal, cells, lib, np.zeros(50))
    assert set(p) == {"a", "b"} and (both < only_a).all()  # b reported either way, combined only when named
    heavy, _, heavy_cal = combine(cal, cells, lib, np.zeros(50), weights={"b": 3.0})
    assert (heavy < both).all()  # the shifted component weighs more
    assert abs((heavy_cal < 0.05).mean() - 0.05) < 0.02  # and the weighted sum is still calibrated
    out = sv.tl.reference_coverage(query, reference=ref, extra_evidence=True, copy=True, **FAST_COV)
    assert out.uns["vae"]["coverage"]["components"] == list(COMPONENTS + GROUP + LOCAL + SHARED + EXTRA)
    every = COMPONENTS + GROUP + LOCAL + SHARED + EXTRA
    assert out.uns["vae"]["coverage"]["weights"] == {c: WEIGHTS.get(c, 1.0) for c in every}
    for c in every:  # the components and their p-values do not depend on the option
        np.testing.assert_allclose(out.obs[f"vae_{c}_p"], scored.obs[f"vae_{c}_p"])
    assert not np.allclose(out.obs["vae_coverage"], scored.obs["vae_coverage"])


def test_neighbourhood_enters_the_coverage_with_enough_held_out_cells(mapped, scored, monkeypatch):
    from sc_vi_ext.tl import _coverage_parts as _coverage

    ref, query = mapped
    n_cal = scored.uns["vae"]["coverage"]["calibration"]["n_cells"]
    assert n_cal < _coverage.MIN_LOCAL_CALIBRATION  # the small reference: reported, not combined
    assert "neighbourhood" not in scored.uns["vae"]["coverage"]["components"]
    monkeypatch.setattr(_coverage, "MIN_LOCAL_CALIBRATION", n_cal)
    out = sv.tl.reference_coverage(query, reference=ref, copy=True, **FAST_COV)
    assert out.uns["vae"]["coverage"]["components"] == list(COMPONENTS + GROUP + LOCAL)
    np.testing.assert_allclose(out.obs["vae_neighbourhood_p"], scored.obs["vae_neighbourhood_p"])
    assert not np.allclose(out.obs["vae_coverage"], scored.obs["vae_coverage"])


def test_abundance_is_calibrated_and_sees_a_crowded_place():
    rng = np.random.default_rng(0)
    cal, query = rng.normal(size=(300, 3)), rng.normal(size=(1000, 3))  # the query 3.3x the held-out cells
    z_cal, z = abundance(cal, query, 30, rng=rng)
    assert z_cal.shape == (300,) and z.shape == (1000,)
    p = tail_pvalue(z_cal, z)  # exchangeable sets: a query cell's value has the held-out cells' distribution
    assert abs((p < 0.05).mean() - 0.05) < 0.025 and abs((p < 0.2).mean() - 0.2) < 0.05
    crowd = np.vstack([query[:850], rng.normal(4.0, 0.3, size=(150, 3))])  # 15% of the query where no held-out cell is
    z_cal, z = abundance(cal, crowd, 30, rng=rng)
    p = tail_pvalue(z_cal, z)
    assert (p[850:] < 0.05).mean() > 0.9 and (p[:850] < 0.05).mean() < 0.06
    assert roc_auc_score(np.r_[np.zeros(850), np.ones(150)], z) > 0.97
    z_cal, z = abundance(cal, query[:60], 30, rng=rng)  # a query smaller than the held-out set: still calibrated
    assert abs((tail_pvalue(z_cal, z) < 0.2).mean() - 0.2) < 0.12
    # coinciding points (each query cell a copy of a held-out cell): a cell is never its own neighbour
    z_cal, z = abundance(cal[:50], cal[:50].copy(), 10, rng=rng)
    assert np.isfinite(z).all() and np.median(z) < 0  # each query cell's twin is a held-out cell
    z_cal, z = abundance(cal[:12], query[:5], 30, rng=rng)  # tiny sets: k capped, values finite
    assert np.isfinite(z_cal).all() and np.isfinite(z).all()


def test_group_test_flags_the_novel_group(mapped, scored):
    ref, query = mapped
    out = sv.tl.reference_coverage(query, reference=ref, groupby="cell_type", copy=True, **FAST_COV)
    res = out.uns["vae"]["coverage"]
    assert res["groups_shifted"] == ["type_3"]
    groups = out.obs["cell_type"].astype(str)
    for g, r in res["groups"].items():
        assert {"shift_statistic", "shift_pvalue", "shift_fdr", "shift_score", "n_controls"} <= set(r)
        assert len(r["shift_genes"]) == len(r["shift_genes_z"]) == 20
        np.testing.assert_allclose(out.obs["vae_group_shift"][groups == g], r["shift_score"])
    assert (out.obs["vae_group_shifted"] == (groups == "type_3")).all()
    markers = set(out.var_names[out.var["marker_of"] == "type_3"])
    assert len(set(res["groups"]["type_3"]["shift_genes"][:10]) & markers) >= 5
    np.testing.assert_allclose(out.obs["vae_coverage"], scored.obs["vae_coverage"])  # the per-cell values unchanged
    # the default groups (the batch): one group, too few to score
    assert np.isnan(scored.obs["vae_group_shift"]).all() and not scored.obs["vae_group_shifted"].any()
    _, ax = plt.subplots()  # the plot names the shifted group on its bar
    sv.pl.reference_coverage(out, ax=ax)
    assert sum("group shifted" in t.get_text() for t in ax.texts) == 1
    plt.close("all")
    # the reference on itself: every cell is a reference cell, so no group is tested
    own = sv.tl.reference_coverage(ref, reference=ref, groupby="cell_type", copy=True, **FAST_COV)
    assert not any("shift_statistic" in r for r in own.uns["vae"]["coverage"]["groups"].values())
    assert own.uns["vae"]["coverage"]["groups_shifted"] == [] and np.isnan(own.obs["vae_group_shift"]).all()
    # cells without a group are in none; the other cells of their type are still tested
    q = query.copy()
    q.obs["cell_type"] = q.obs["cell_type"].astype(object)
    q.obs.loc[q.obs_names[(q.obs["cell_type"] == "type_3").to_numpy()][:5], "cell_type"] = np.nan
    part = sv.tl.reference_coverage(q, reference=ref, groupby="cell_type", copy=True, **FAST_COV)
    unlabelled = part.obs["cell_type"].isna().to_numpy()
    assert not part.obs["vae_group_shifted"].to_numpy()[unlabelled].any()
    assert np.isnan(part.obs["vae_group_shift"].to_numpy()[unlabelled]).all()
    assert part.uns["vae"]["coverage"]["groups_shifted"] == ["type_3"]


def test_common_shift_enters_the_coverage_with_enough_query_cells(mapped, scored, monkeypatch):
    from sc_vi_ext.diagnostics import coverage_shift as shift

    ref, query = mapped
    assert query.n_obs < shift.MIN_CELLS  # the small query: reported, not combined
    assert "common_shift" not in scored.uns["vae"]["coverage"]["components"]
    assert scored.uns["vae"]["coverage"]["common_shift_used"]  # found, but on too few cells to combine
    monkeypatch.setattr(shift, "MIN_CELLS", query.n_obs)
    out = sv.tl.reference_coverage(query, reference=ref, copy=True, **FAST_COV)
    assert out.uns["vae"]["coverage"]["components"] == list(COMPONENTS + GROUP + SHARED)
    assert out.uns["vae"]["coverage"]["weights"]["common_shift"] == WEIGHTS["common_shift"]
    np.testing.assert_allclose(out.obs["vae_common_shift_p"], scored.obs["vae_common_shift_p"])
    # combined, it adds evidence: the lower its p-value, the more coverage a cell loses by it
    drop = np.log(scored.obs["vae_coverage"].to_numpy()) - np.log(out.obs["vae_coverage"].to_numpy())
    assert spearmanr(-np.log(out.obs["vae_common_shift_p"].to_numpy()), drop).statistic > 0.15
    # a direction not used (the guard, or too few cells) stays out, with extra_evidence too
    extra = {"in_reference": np.zeros(5000, bool), "shift_found": False}
    for every in (False, True):
        _, comps = combined_components(10, extra, labels_key=None, extra_evidence=every)
        assert "common_shift" not in comps
    _, comps = combined_components(10, {**extra, "shift_found": True}, labels_key=None, extra_evidence=False)
    assert "common_shift" in comps
