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
    assert p == 1 / 100 and t > 5 and z.shape == (50,) and (z > 0).mean() > 0.9


def test_a_shifted_group_is_flagged_and_named_by_its_genes():
    rng = np.random.default_rng(1)
    groups, excess, pos, cal_excess, cal_pos, var = _groups(rng)
    shifted = groups == "g4"
    excess[np.ix_(shifted, np.arange(10))] += 0.8  # 5% of the genes, 0.8 sd in every cell of one group
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng)
    assert set(out) == {f"g{i}" for i in range(6)}
    flagged = [g for g, r in out.items() if r["shift_flagged"]]
    assert flagged == ["g4"]
    assert out["g4"]["shift_pvalue"] == 1 / (N_PERMUTATIONS + 1) and out["g4"]["shift_score"] > 3
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


def test_held_out_cells_in_the_query_are_controls_not_group_cells():
    rng = np.random.default_rng(3)
    groups, excess, pos, cal_excess, cal_pos, var = _groups(rng, n=60, n_cal=60)
    # the reference scored on itself: half of each group's cells are the held-out cells
    same = np.arange(len(pos)) % 2 == 0
    own = np.full(len(pos), -1)
    own[same] = np.arange(same.sum())
    cal_excess, cal_pos = excess[same], pos[same]
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng, in_calibration=own)
    assert len(out) == 6 and not any(r["shift_flagged"] for r in out.values())
    assert all(0.6 < r["shift_statistic"] < 1.5 for r in out.values())  # about 1: no cell on both sides
    groups = np.where(same, groups, "g0")  # a group of held-out cells only: none left to test
    out = group_shifts(groups, excess, pos, cal_excess, cal_pos, var, alpha=0.05, rng=rng, in_calibration=own)
    assert set(out) == {"g0"}
