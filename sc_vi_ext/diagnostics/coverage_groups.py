"""Reference coverage per group: does a group of query cells differ from the reference at its place.

A new state of a known type can be too weak for any single cell and for a neighbourhood of
30, yet plain in a few hundred cells. The group test asks, per group of query cells (a
``groupby`` column: clusters or transferred labels), whether the group's mean residual excess
(:func:`~sc_vi_ext.diagnostics.coverage_local.local_excess`, each cell's residuals at z* minus
those of its nearest reference training cells) differs from that of matched controls: the
reference's held-out cells nearest to the group's cells at z*, which are new to the model
like the query and sit at the same place.

``shift_statistic``
    T = mean over genes of d_g^2 / (v_g (1 / n + 1 / n_c)): d_g the difference of the mean
    excess of the group's ``n`` cells (at most ``MAX_CELLS``, drawn at random) and of its
    ``n_c`` controls, v_g the per-cell variance of a held-out cell's excess.
``shift_pvalue``
    Permutation p-value of T: the group's cells and its controls exchanged at random
    (``N_PERMUTATIONS`` times). Exact where query and reference differ by nothing but the state:
    within one batch of the reference. A batch the reference never saw shifts every group a
    little, and a few hundred cells make that significant everywhere.
``shift_score``
    A robust z-score of T among the query's groups: (T - median) / (1.4826 x MAD), the MAD at
    least the sampling sd of a mean of squared z-scores over the genes. A group shifted more than
    the query's typical group; this assumes that most groups are covered, as the batch
    corrections of the per-cell coverage do.

A group is flagged where both say so: its permutation p-value, adjusted by Benjamini-Hochberg
over the tested groups, and the upper-tail normal p-value of its score are below ``alpha``.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

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
    return float(t[0]), float((1 + (t[1:] >= t[0]).sum()) / (n_permutations + 1)), z[0]


def group_shifts(groups: np.ndarray, excess: np.ndarray, positions: np.ndarray, cal_excess: np.ndarray,
                 cal_positions: np.ndarray, variance: np.ndarray, *, alpha: float, rng: np.random.Generator,
                 in_calibration: np.ndarray | None = None) -> dict[str, dict]:
    """Return the group test (module docstring) of each group with at least ``MIN_CELLS`` query cells.

    ``groups``: per query cell, its group; ``excess`` and ``positions``: the query cells' local
    excess and z*; ``cal_*``: the same of the held-out reference cells. ``in_calibration``: per
    query cell, its row among the held-out cells where it is one (the reference scored on
    itself), else -1: such cells are controls, never in a group's sample. Per tested group:
    ``shift_statistic``, ``shift_pvalue``, ``shift_fdr``, ``shift_score`` (NaN with fewer than
    ``MIN_GROUPS`` tested groups), ``shift_flagged``, ``n_controls`` and ``shift_z`` (per gene).
    """
    own = np.full(len(groups), -1) if in_calibration is None else np.asarray(in_calibration)
    out = {}
    for g in sorted(set(groups.tolist())):
        rows = np.flatnonzero((groups == g) & (own < 0))  # a held-out cell is a control, not a group cell
        if len(rows) < MIN_CELLS:
            continue
        rows = np.sort(rng.choice(rows, min(MAX_CELLS, len(rows)), replace=False))
        ctrl = np.unique(nearest(cal_positions, positions[rows], N_CONTROLS))
        t, p, z = shift_test(excess[rows], cal_excess[ctrl], variance, n_permutations=N_PERMUTATIONS, rng=rng)
        out[str(g)] = {"shift_statistic": t, "shift_pvalue": p, "n_controls": len(ctrl), "shift_z": z}
    if not out:
        return out
    fdr = bh_adjust([r["shift_pvalue"] for r in out.values()])
    t = np.array([r["shift_statistic"] for r in out.values()])
    center = np.median(t)
    spread = max(1.4826 * np.median(np.abs(t - center)), center * np.sqrt(2 / excess.shape[1]))
    for r, q, tg in zip(out.values(), fdr, t, strict=True):
        score = (tg - center) / spread if len(out) >= MIN_GROUPS else np.nan
        r.update(shift_fdr=float(q), shift_score=float(score),
                 shift_flagged=bool(q < alpha and norm.sf(score) < alpha))  # NaN score: never flagged
    return out
