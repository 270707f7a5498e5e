"""Reference coverage, local and group-level evidence: what single-cell scores cannot carry.

A state change of a known type, or a type that differs from the reference by small changes
spread over many genes, leaves each cell's residuals within the noise of its counts: the
decoder fits it almost as well as a reference cell. Summed over the cells of a neighbourhood,
the same small shifts become a systematic, non-zero mean residual in the shifted genes.

``local_excess``
    Each cell's signed deviance residuals at z* minus the mean residuals of its
    ``n_baseline`` nearest reference training cells in the latent space (a local comparison
    with reference cells at the same place; deviance residuals are already on the scale of
    each cell's own expected counts, so the comparison is depth-matched).
``neighbourhood_statistic``
    For each cell, the mean local excess over its ``n_neighbors`` nearest cells of the same
    data set (itself included), as a chi-square over genes standardised to mean 0 and sd 1
    under independent noise: (sum_g m_g^2 / var_g - G) / sqrt(2G). The variance of the mean,
    var_g = s2_g |a|^2 + t2_g |w|^2, counts the neighbourhood's weights a and its cells' pooled
    baseline weights w: neighbouring cells share baseline cells, and a tight neighbourhood
    shares more of them (:func:`noise_variances` estimates s2 and t2).
``latent_density``
    Minus the log density of the cell's encoder mean under the reference's aggregated
    posterior (the mixture of the reference cells' q(z | x)).
``label_uncertainty``
    1 - the top share of reference labels among the ``n_neighbors`` nearest training cells.
``abundance``
    Whether query cells crowd a place where the reference has few cells (Milo-style differential
    abundance, per cell): in the latent space (z*) of the reference's held-out cells together
    with an equal number of query cells, the kernel-weighted share of a cell's nearest cells
    that come from its own set, standardised to a z-score. Held-out and query cells are both
    cells the model was not trained on (its training cells sit apart from any new cell), and
    with the two sets of equal size the statistic of a held-out cell has the null distribution
    of a query cell's: a held-out cell's value calibrates it. The query is split at random into
    chunks the size of the held-out set (the held-out set, where the query is smaller), one joint
    graph per chunk.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

_CHUNK = 2048  # rows of cells per distance block
_MAX_BLOCK = 2 ** 25  # entries per distance block (128 MiB of float32)


def nearest(reference: np.ndarray, cells: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
            return_distances: bool = False):
    """Return the indices (cells, k) of the ``k`` nearest rows of ``reference`` to each row of ``cells`` (Euclidean).

    ``exclude``: per cell, a row of ``reference`` to leave out (the cell itself), or -1.
    ``return_distances``: also return their distances, (distances, indices). The distances are
    computed in blocks of rows of at most ``_MAX_BLOCK`` entries.
    """
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float32))
    k = min(k, len(ref) - (exclude is not None and bool((exclude >= 0).any())))
    out = np.empty((len(cells), k), dtype=np.int64)
    dist = np.empty((len(cells), k)) if return_distances else None
    step = max(1, min(_CHUNK, _MAX_BLOCK // max(len(ref), 1)))
    for lo in range(0, len(cells), step):
        d = torch.cdist(torch.as_tensor(np.asarray(cells[lo:lo + step], dtype=np.float32)), ref)
        if exclude is not None:
            e = torch.as_tensor(exclude[lo:lo + step])
            rows = torch.nonzero(e >= 0).flatten()
            d[rows, e[rows]] = float("inf")
        top = torch.topk(d, k, dim=1, largest=False)
        out[lo:lo + step] = top.indices.numpy()
        if dist is not None:
            dist[lo:lo + step] = top.values.numpy()
    return (dist, out) if return_distances else out


def baseline(positions: np.ndarray, ref_positions: np.ndarray, n_baseline: int, *,
             exclude: np.ndarray | None = None) -> sp.csr_matrix:
    """Row-normalised (cells, reference cells) averaging over each cell's ``n_baseline`` nearest reference cells."""
    return _averaging(nearest(ref_positions, positions, n_baseline, exclude=exclude), len(ref_positions))


def local_excess(residuals: np.ndarray, ref_residuals: np.ndarray, base: sp.csr_matrix) -> np.ndarray:
    """Residuals minus the mean residuals of each cell's baseline reference cells (``base``), float32."""
    return (residuals - base @ ref_residuals).astype(np.float32)


def _averaging(idx: np.ndarray, n_cols: int) -> sp.csr_matrix:
    n, k = idx.shape
    return sp.csr_matrix((np.full(n * k, 1.0 / k, np.float32), idx.ravel(), np.arange(0, n * k + 1, k)),
                         shape=(n, n_cols))


def neighbourhoods(positions: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """Row-normalised (cells, cells) averaging matrix over each cell's nearest cells (itself included)."""
    return baseline(positions, positions, n_neighbors)


def _squared_norms(rows: sp.csr_matrix, right: sp.csr_matrix | None = None) -> np.ndarray:
    """Squared norm of each row of ``rows`` (of ``rows @ right`` where given, in chunks of rows)."""
    out = np.empty(rows.shape[0])
    for lo in range(0, rows.shape[0], _CHUNK):
        w = rows[lo:lo + _CHUNK] if right is None else rows[lo:lo + _CHUNK] @ right
        out[lo:lo + _CHUNK] = np.asarray(w.multiply(w).sum(1)).ravel()
    return out


def noise_variances(ref_residuals: np.ndarray, ref_positions: np.ndarray, cal_variance: np.ndarray,
                    cal_base: sp.csr_matrix, n_baseline: int, *, floor: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene residual noise variance around the local mean: of calibration cells and of baseline cells.

    A baseline cell's own excess against its ``n_baseline`` nearest other baseline cells has
    variance t2 (1 + 1/k); a calibration cell's excess has variance s2 + t2 |b|^2 (per gene,
    ``cal_variance`` over the calibration cells), |b|^2 the sum of its squared baseline weights.
    s2 is c t2, one factor c for all genes: a per-gene variance estimated on the calibration
    cells themselves would fit them better than new cells (on a few dozen cells, by 10-15 % per
    cell), and the comparison would not be like for like.
    Returns (s2, t2), each at least ``floor``.
    """
    own = baseline(ref_positions, ref_positions, n_baseline, exclude=np.arange(len(ref_positions)))
    k = np.diff(own.indptr).mean()
    t2 = np.maximum(local_excess(ref_residuals, ref_residuals, own).var(axis=0) / (1 + 1 / k), floor)
    b2 = float(_squared_norms(cal_base).mean())
    c = max(float((cal_variance - t2 * b2).sum() / t2.sum()), floor)
    s2 = np.maximum(c * t2, floor)
    return s2.astype(np.float32), t2.astype(np.float32)


def neighbourhood_statistic(excess: np.ndarray, averaging: sp.csr_matrix, base: sp.csr_matrix, s2: np.ndarray,
                            t2: np.ndarray) -> np.ndarray:
    """Standardised chi-square over genes of each neighbourhood's mean excess (see the module docstring).

    Each gene's mean excess m over the neighbourhood (weights a, its cells' baselines pooled: weights
    w = a @ base) has variance s2 |a|^2 + t2 |w|^2 under independent noise, whatever the overlap of
    the cells' baselines; the chi-square sum_g m_g^2 / var_g is centred by G and scaled by sqrt(2G).
    """
    mean = averaging @ excess
    a2, w2 = _squared_norms(averaging), _squared_norms(averaging, base)
    chi = (mean ** 2 / (s2[None] * a2[:, None] + t2[None] * w2[:, None])).sum(1)
    g = excess.shape[1]
    return (chi - g) / np.sqrt(2 * g)


def shifted_genes(excess: np.ndarray, variance: np.ndarray, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``n_genes`` genes whose mean excess over these cells is largest in size, and their z-scores."""
    z = excess.mean(0) / np.sqrt(variance / max(len(excess), 1))
    best = top_by_size(z, n_genes)
    return best, z[best]


def top_by_size(z: np.ndarray, n: int) -> np.ndarray:
    """Return the indices of the ``n`` entries of ``z`` largest in size, largest first (ties: the first index)."""
    return np.argsort(-np.abs(z), kind="stable")[:n]


@torch.no_grad()
def latent_density(mean: np.ndarray, log_var: np.ndarray, cells: np.ndarray, *,
                   exclude: np.ndarray | None = None) -> np.ndarray:
    """-log density of each row of ``cells`` under the mixture of N(mean_j, exp(log_var_j)) (float64).

    ``exclude``: per cell, a mixture component to leave out (the cell's own), or -1.
    """
    mu, lv = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(log_var, dtype=torch.float64)
    inv = torch.exp(-lv)
    const = -0.5 * (lv + np.log(2 * np.pi)).sum(1)
    out = np.empty(len(cells))
    for lo in range(0, len(cells), 512):
        z = torch.as_tensor(np.asarray(cells[lo:lo + 512]), dtype=torch.float64)
        lp = const[None] - 0.5 * ((z[:, None, :] - mu[None]) ** 2 * inv[None]).sum(-1)
        n = torch.full((len(z),), float(len(mu)), dtype=torch.float64)
        if exclude is not None:
            e = torch.as_tensor(exclude[lo:lo + 512])
            rows = torch.nonzero(e >= 0).flatten()
            lp[rows, e[rows]] = -float("inf")
            n[rows] -= 1
        out[lo:lo + 512] = (-(torch.logsumexp(lp, 1) - torch.log(n))).numpy()
    return out


def label_uncertainty(ref_positions: np.ndarray, labels: np.ndarray, cells: np.ndarray, *, n_neighbors: int = 15,
                      exclude: np.ndarray | None = None) -> np.ndarray:
    """1 - the largest share of one label among each cell's ``n_neighbors`` nearest reference cells."""
    _, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    idx = nearest(ref_positions, cells, n_neighbors, exclude=exclude)
    votes = codes[idx]
    top = np.zeros(len(cells))
    for c in range(codes.max() + 1):
        top = np.maximum(top, (votes == c).mean(1))
    return 1 - top


def _own_share(positions: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Z-score of the kernel-weighted share of each row's ``k`` nearest other rows that are in its own set.

    Weights exp(-(d / d_k)^2), d_k the distance to the k-th nearest; the share's null mean is the
    share of the other rows in the own set, its variance that of a mean of k_eff = (sum w)^2 / sum w^2
    independent draws.
    """
    n, n_own = len(positions), int(own.sum())
    # a row is not its own neighbour, even where points coincide
    d, idx = nearest(positions, positions, k, exclude=np.arange(n), return_distances=True)
    w = np.exp(-((d / np.maximum(d[:, -1:], 1e-12)) ** 2))
    share = (w * (own[idx] == own[:, None])).sum(1) / w.sum(1)
    k_eff = w.sum(1) ** 2 / (w ** 2).sum(1)
    p = np.clip(np.where(own, n_own - 1, n - n_own - 1) / (n - 1), 1 / (n - 1), 1 - 1 / (n - 1))
    return (share - p) / np.sqrt(p * (1 - p) / k_eff)


def abundance(cal_positions: np.ndarray, positions: np.ndarray, n_neighbors: int, *,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``abundance`` statistic (module docstring) of the calibration cells and of the query cells.

    ``cal_positions``: the held-out reference cells; ``positions``: the query cells. The larger
    of the two sets is split at random into chunks of about the smaller one's size; each chunk
    and the whole smaller set make one joint graph, which gives the chunk's cells their values.
    Each cell of the smaller set keeps its value from one of the graphs (in turn), a draw from
    the same null. Returns (calibration values, query values); ``n_neighbors`` is capped at a
    third of the smaller set.
    """
    sets = [np.asarray(cal_positions), np.asarray(positions)]
    small = int(len(sets[1]) < len(sets[0]))  # 0: the calibration set is the smaller one
    few, many = sets[small], sets[1 - small]
    k = max(1, min(n_neighbors, len(few) // 3))
    chunks = np.array_split(rng.permutation(len(many)), max(1, round(len(many) / len(few))))
    out_many, out_few = np.empty(len(many)), np.empty((len(chunks), len(few)))
    for j, rows in enumerate(chunks):
        own = np.r_[np.zeros(len(few), bool), np.ones(len(rows), bool)]
        z = _own_share(np.vstack([few, many[rows]]), own, min(k, len(own) - 1))
        out_few[j], out_many[rows] = z[:len(few)], z[len(few):]
    out_few = out_few[np.arange(len(few)) % len(chunks), np.arange(len(few))]
    return (out_few, out_many) if small == 0 else (out_many, out_few)


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (the false-discovery rate of flagging at each p)."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p)
    q = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    out = np.empty_like(q)
    out[order] = np.minimum(q, 1.0)
    return out
