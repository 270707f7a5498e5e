"""Reference coverage, a shared direction: many query cells shifted together, each within its noise.

A type that differs from the reference by small changes spread over many genes, or a known type
in a new state, leaves each cell's residual excess (its residuals at z* minus its nearest
reference training cells', :func:`~sc_vi_ext.diagnostics.coverage_local.local_excess`) within the
counts' noise gene by gene, and a chi-square over all genes cannot see it (2,000 genes of noise
against a shift of a few hundred small ones). Along the shift's own direction the same cells stand
far out: the excess of every altered cell adds up there. The direction is unknown but shared, so
it can be found in the query: a minority of cells shifted together gives the projections on it a
long one-sided tail, which noise and smooth variation do not. :func:`common_shift` looks for the
most skewed direction among the leading principal components of one half of the query and
scores the other half on it, so that no cell is scored on a direction fitted to its own noise.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.extmath import randomized_svd

N_DIRECTIONS = 10  # leading principal components searched for the skewed direction
MIN_CELLS = 1000  # query cells (not reference cells) the direction needs; fewer: reported only (docs/coverage.md)
MAX_CALIBRATION_RANK = 0.75  # the highest share of a half's projections the held-out cells' median may exceed


def common_shift(excess: np.ndarray, cal_excess: np.ndarray, variance: np.ndarray, *, rng: np.random.Generator,
                 fit: np.ndarray | None = None,
                 n_directions: int = N_DIRECTIONS) -> tuple[np.ndarray, np.ndarray, bool]:
    """Each cell's local excess along the direction a minority of the query's cells shift together.

    The query's cells (those in ``fit``, default all) are split at random in two halves; each half
    is scored on a direction found in the other half's ``fit`` cells: among their ``n_directions``
    leading principal components of the excess (genes scaled by ``variance``), whitened, the unit
    direction of largest skewness (:func:`_skewed_direction`), oriented so that the long tail is
    positive. A population that shifts together in many genes, each within its counts' noise,
    makes such a tail; noise and smooth variation do not. A half's projections are located at
    their own median (most query cells are covered) and scaled by the calibration cells' spread
    on the same direction (1.4826 MAD); a calibration cell is scored on one of the two
    directions, drawn at random, from the calibration cells' median.

    The orientation assumes that the altered cells are the minority. Where they are not, the tail
    is the covered cells, and there the calibration cells lie too: where the calibration cells'
    median lies above ``MAX_CALIBRATION_RANK`` of a half's ``fit`` cells' projections, the
    direction is not used. Returns (query statistic, calibration statistic, whether the
    directions were used); zeros and False where not, where a half's ``fit`` cells are no more
    than ``n_directions``, or where the calibration cells do not spread along a direction.
    """
    w = 1.0 / np.sqrt(np.maximum(variance, 1e-12))
    q, c = excess * w, cal_excess * w
    fit = np.ones(len(q), bool) if fit is None else np.asarray(fit, bool)
    half, cal_half = rng.integers(0, 2, len(q)), rng.integers(0, 2, len(c))  # cells outside fit: scored only
    out, cal = np.zeros(len(q)), np.zeros(len(c))
    none = np.zeros(len(q)), np.zeros(len(c)), False
    for h in (0, 1):
        train, test = fit & (half != h), half == h
        if train.sum() <= n_directions or not (fit & test).any() or len(c) == 0:
            return none
        mu = q[train].mean(0, dtype=np.float64)
        f = q[train] - mu
        _, sing, vt = randomized_svd(f, n_directions, random_state=int(rng.integers(2 ** 31)))
        white = vt.T / np.maximum(sing / np.sqrt(len(f)), 1e-12)  # leading components, unit variance
        v = white @ _skewed_direction(f @ white)
        proj_c = (c - mu) @ v
        med = np.median(proj_c)
        sd = 1.4826 * np.median(np.abs(proj_c - med))
        proj_q = (q[test] - mu) @ v
        if sd < 1e-6 or (proj_q[fit[test]] < med).mean() > MAX_CALIBRATION_RANK:  # the tail is where they are
            return none
        out[test] = (proj_q - np.median(proj_q[fit[test]])) / sd
        cal[cal_half == h] = (proj_c[cal_half == h] - med) / sd
    return out, cal, True


def _skewed_direction(y: np.ndarray, n_iter: int = 50) -> np.ndarray:
    """Return the unit vector a maximising |skewness| of y @ a for whitened rows y (cells, m), tail positive.

    Fixed-point iteration a <- E[y (y a)^2] / |.| (a stationary point of the third moment), started
    from each axis; the best of the ends is kept.
    """
    best, best_skew = np.eye(y.shape[1])[0], 0.0
    for j in range(y.shape[1]):
        a = np.eye(y.shape[1])[j]
        for _ in range(n_iter):
            nxt = (y * ((y @ a) ** 2)[:, None]).mean(0)
            nxt /= max(np.linalg.norm(nxt), 1e-12)
            done = abs(nxt @ a) > 1 - 1e-9
            a = nxt
            if done:
                break
        u = y @ a
        u = u - u.mean()
        sk = float((u ** 3).mean() / max((u ** 2).mean(), 1e-12) ** 1.5)
        if abs(sk) > abs(best_skew):
            best, best_skew = a, sk
    return best * (1.0 if best_skew >= 0 else -1.0)
