"""Reference coverage per group: does a group of query cells differ from the reference at its place.

A new state of a known type can be too weak for any single cell and for a neighbourhood of
30, yet plain in a few hundred cells. The group test asks, per group of query cells (a
``groupby`` column: clusters or transferred labels), whether the group's mean residual excess
(:func:`~sc_vi_ext.diagnostics.coverage_local.local_excess`, each cell's residuals at z* minus
those of its nearest reference training cells) differs from that of matched controls: the
reference's held-out cells nearest to the group's cells at z*, which are new to the model
like the query and sit at the same place. Query cells that are reference cells (the reference
scored on itself) are never in a group.

``shift_statistic``
    T = mean over genes of d_g^2 / (v_g f), f = 1 / n + 1 / n_c: d_g the difference of the mean
    excess of the group's ``n`` cells (at most ``MAX_CELLS``, drawn at random) and of its
    ``n_c`` controls, v_g the per-cell variance of a held-out cell's excess (at least 1, a
    deviance residual's noise). About 1 where nothing differs.
``shift_pvalue``
    Permutation p-value of T: the group's cells and its controls exchanged at random
    (``N_PERMUTATIONS`` times), beyond the permutations' top tenth from an exponential tail
    fitted to them, so that many groups can still pass a false-discovery rate. Exact where query
    and reference differ by nothing but the state: within one batch of the reference. A batch the
    reference never saw leaves every group a little off, and a few hundred cells make that
    significant everywhere.
``shift_effect``
    (T - 1) f: the mean over genes of the squared shift in units of a cell's noise, free of the
    group's size (T grows with the cells for a given shift).
``shift_score``
    A robust z-score of the effect among the query's groups: (effect - median) / s, s the larger
    of 1.4826 x the MAD of the groups' effects and the group's own sampling sd of its effect,
    f sqrt(2 / G). A group shifted more than the query's typical group; this assumes that most
    groups are covered, as the batch corrections of the per-cell coverage do.

A group is flagged where both say so: its permutation p-value, adjusted by Benjamini-Hochberg
over the tested groups, and the upper-tail normal p-value of its score are below ``alpha``. The
score's tail is per group: where every group passes the permutation test (a new batch), about
``alpha`` of covered groups are flagged.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from .coverage import tail_pvalue
from .coverage_local import bh_adjust, nearest

MIN_CELLS = 10  # cells a group needs to be tested
MIN_GROUPS = 4  # tested groups the robust score needs (fewer: no score, no flag)
MAX_CELLS = 300  # cells per group in the test (a random subset of larger groups), for comparable statistics
N_CONTROLS = 2  # nearest held-out cells per group cell, pooled into the group's controls
N_PERMUTATIONS = 200


def shift_test(excess: np.ndarray, ctrl_excess: np.ndarray, variance: np.ndarray, *, n_permutations: int,
               rng: np.random.Generator) -> tuple[float, float, np.ndarray]:
    """T of the group (rows of ``excess``) against its controls, its permutation p-value and the per-gene z-scores."""
    pool = np.vstack([excess, ctrl_excess]).astype(np.float64)
    n, n1 = len(pool), len(excess)
    pick = np.zeros((n_permutations + 1, n))
    pick[0, :n1] = 1
    for i in range(1, n_permutations + 1):
        pick[i, rng.permutation(n)[:n1]] = 1
    sums = pick @ pool
    se = np.sqrt(np.asarray(variance, np.float64) * (1 / n1 + 1 / (n - n1)))
    z = (sums / n1 - (pool.sum(0) - sums) / (n - n1)) / se
    t = (z ** 2).mean(1)
    return float(t[0]), float(tail_pvalue(t[1:], t[:1])[0]), z[0]


def group_shifts(groups: np.ndarray, excess: np.ndarray, positions: np.ndarray, cal_excess: np.ndarray,
                 cal_positions: np.ndarray, variance: np.ndarray, *, alpha: float, rng: np.random.Generator,
                 exclude: np.ndarray | None = None) -> dict[str, dict]:
    """Return the group test (module docstring) of each group with at least ``MIN_CELLS`` query cells.

    ``groups``: per query cell, its group (as a string); ``excess`` and ``positions``: the query
    cells' local excess and z*; ``cal_*``: the same of the held-out reference cells.
    ``exclude``: query cells in no group (reference cells, cells without a group). Per tested
    group: ``shift_statistic``, ``shift_pvalue``, ``shift_fdr``, ``shift_effect``,
    ``shift_score`` (NaN with fewer than ``MIN_GROUPS`` tested groups), ``shift_flagged``,
    ``n_cells`` (in the test), ``n_controls`` and ``shift_z`` (per gene).
    """
    groups = np.asarray(groups).astype(str)
    free = np.ones(len(groups), bool) if exclude is None else ~np.asarray(exclude, bool)
    n_genes = excess.shape[1]
    out = {}
    for g in sorted(set(groups[free].tolist())):
        rows = np.flatnonzero((groups == g) & free)
        if len(rows) < MIN_CELLS:
            continue
        rows = np.sort(rng.choice(rows, min(MAX_CELLS, len(rows)), replace=False))
        ctrl = np.unique(nearest(cal_positions, positions[rows], N_CONTROLS))
        t, p, z = shift_test(excess[rows], cal_excess[ctrl], variance, n_permutations=N_PERMUTATIONS, rng=rng)
        f = 1 / len(rows) + 1 / len(ctrl)
        out[g] = {"shift_statistic": t, "shift_pvalue": p, "shift_effect": (t - 1) * f, "n_cells": len(rows),
                  "n_controls": len(ctrl), "shift_z": z}
    if not out:
        return out
    fdr = bh_adjust([r["shift_pvalue"] for r in out.values()])
    effect = np.array([r["shift_effect"] for r in out.values()])
    center = np.median(effect)
    mad = 1.4826 * np.median(np.abs(effect - center))
    for r, q in zip(out.values(), fdr, strict=True):
        sd = (1 / r["n_cells"] + 1 / r["n_controls"]) * np.sqrt(2 / n_genes)  # the sampling sd of its effect
        score = (r["shift_effect"] - center) / max(mad, sd) if len(out) >= MIN_GROUPS else np.nan
        r.update(shift_fdr=float(q), shift_score=float(score),
                 shift_flagged=bool(q < alpha and norm.sf(score) < alpha))  # NaN score: never flagged
    return out
