"""The coverage's group test: a group of query cells shifted from the reference at its place is flagged."""

from __future__ import annotations

import numpy as np

from sc_vi_ext.diagnostics.coverage_groups import MIN_GROUPS, N_PERMUTATIONS, group_shifts, shift_test


def _groups(rng, n_groups=6, n=120, n_cal=60, n_genes=200):
    """Query and held-out cells in ``n_groups`` latent clusters, unit-noise excess everywhere."""
    centers = rng.normal(0, 10, size=(n_groups, 2))
    groups = np.repeat([f"g{i}" for i in range(n_groups)], n)
    pos = centers.repeat(n, 0) + rng.normal(size=(n_groups * n, 2))
    cal_pos = centers.repeat(n_cal, 0) + rng.normal(size=(n_groups * n_cal, 2))
    excess = rng.normal(size=(len(pos), n_genes)).astype(np.float32)
    cal_excess = rng.normal(size=(len(cal_pos), n_genes)).astype(np.float32)
    return groups, excess, pos, cal_excess, cal_pos, np.ones(n_genes, np.float32)


def test_permutation_pvalue_is_calibrated_where_nothing_is_shifted():
    rng = np.random.default_rng(0)
    p = np.array([shift_test(rng.normal(size=(40, 50)), rng.normal(size=(30, 50)), np.ones(50),
                             n_permutations=99, rng=rng)[1] for _ in range(200)])
    assert abs((p < 0.1).mean() - 0.1) < 0.06 and abs((p < 0.5).mean() - 0.5) < 0.12
    t, p, z = shift_test(rng.normal(size=(40, 50)) + 0.8, rng.normal(size=(30, 50)), np.ones(50),
                         n_permutations=99, rng=rng)
    assert p < 1 / 100 and t > 5 and z.shape == (50,) and (z > 0).mean() > 0.9  # p: beyond the permutations


def test_a_shifted_group_is_flagged_and_named_by_its_genes():
    rng = np.random.default_rng(1)
    groups, excess, pos, cal_excess, cal_pos, var = _groups(rng)
    shifted = groups == "g4"
    excess[np.ix_(shifted, np.arange(10))] += 0.8  # 5% of the genes, 0.8 sd in every cell of one group
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng)
    assert set(out) == {f"g{i}" for i in range(6)}
    flagged = [g for g, r in out.items() if r["shift_flagged"]]
    assert flagged == ["g4"]
    assert out["g4"]["shift_pvalue"] < 1 / (N_PERMUTATIONS + 1) and out["g4"]["shift_score"] > 3
    assert len(set(np.argsort(-np.abs(out["g4"]["shift_z"]))[:10]) & set(range(10))) >= 8
    others = [r["shift_score"] for g, r in out.items() if g != "g4"]
    assert max(others) < 2.5 and all(r["n_controls"] > 0 for r in out.values())
    # a small shift of the whole query (what a batch the reference never saw leaves): most groups differ
    # from the reference beyond noise, and only the group shifted more than the others is flagged
    offset = np.zeros(excess.shape[1], np.float32)
    offset[100:120] = 0.3
    out = group_shifts(groups, excess + offset, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng)
    assert sum(r["shift_fdr"] < 0.05 for r in out.values()) >= 4
    assert [g for g, r in out.items() if r["shift_flagged"]] == ["g4"]


def test_small_and_few_groups_are_not_scored():
    rng = np.random.default_rng(2)
    groups, excess, pos, cal_excess, cal_pos, var = _groups(rng, n_groups=MIN_GROUPS - 1)
    groups = groups.copy()
    groups[:5] = "tiny"  # fewer than the cells a test needs
    excess[groups == "g1"] += 1.0
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng)
    assert "tiny" not in out and len(out) == MIN_GROUPS - 1
    assert all(np.isnan(r["shift_score"]) and not r["shift_flagged"] for r in out.values())
    assert out["g1"]["shift_pvalue"] < 0.05  # the permutation test is still reported


def test_excluded_cells_are_in_no_group():
    rng = np.random.default_rng(3)
    groups, excess, pos, cal_excess, cal_pos, var = _groups(rng, n=60, n_cal=60)
    excess[groups == "g2"] += 1.0
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng)
    assert out["g2"]["shift_flagged"] and out["g2"]["n_cells"] == 60
    gone = groups == "g2"  # e.g. reference cells, or cells without a group
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng, exclude=gone)
    assert "g2" not in out and not any(r["shift_flagged"] for r in out.values())
    half = gone & (np.arange(len(groups)) % 2 == 0)
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng, exclude=half)
    assert out["g2"]["n_cells"] == 30


def test_many_groups_one_shifted_passes_the_false_discovery_rate():
    rng = np.random.default_rng(4)
    groups, excess, pos, cal_excess, cal_pos, var = _groups(rng, n_groups=20, n=60, n_cal=30)
    excess[np.ix_(groups == "g7", np.arange(20))] += 1.0
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng)
    assert out["g7"]["shift_pvalue"] < 0.05 / 20  # resolved beyond the permutations' smallest p-value
    assert [g for g, r in out.items() if r["shift_flagged"]] == ["g7"]


def test_the_score_is_free_of_the_group_size():
    rng = np.random.default_rng(5)
    groups, excess, pos, cal_excess, cal_pos, var = _groups(rng, n_groups=8, n=250, n_cal=60)
    keep = np.ones(len(groups), bool)
    for i in range(8):  # groups of 20 to 250 cells
        keep[np.flatnonzero(groups == f"g{i}")[20 + 30 * i:]] = False
    groups, excess, pos = groups[keep], excess[keep], pos[keep]
    offset = np.zeros(excess.shape[1], np.float32)
    offset[:40] = 0.4  # the same small shift of every group (a batch the reference never saw)
    out = group_shifts(groups, excess + offset, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng)
    t = [out[f"g{i}"]["shift_statistic"] for i in range(8)]
    assert t[-1] - 1 > 2 * (t[0] - 1)  # the statistic grows with the cells
    assert not any(r["shift_flagged"] for r in out.values())  # the score does not
    score = [out[f"g{i}"]["shift_score"] for i in range(8)]
    assert np.corrcoef(np.arange(8), score)[0, 1] < 0.5  # a score of T itself would rank the groups by size
    effect = [out[f"g{i}"]["shift_effect"] for i in range(8)]
    assert abs(np.median(effect) - 40 / 200 * 0.4 ** 2) < 0.008  # the mean squared shift per gene
