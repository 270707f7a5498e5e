"""Per-cell trust from the amortization gap: each cell against training cells of similar depth.

The amortization gap in nats grows with the counts at stake, so a raw gap does not say
whether the encoder serves a cell badly. Here each cell's gap is compared with the gaps of
the ``n_neighbors`` training cells nearest to it in log library size: the encoder was fitted
on those, so they show what a well-served cell of that depth looks like.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 65_536  # cells per block: the (cells, n_neighbors) window stays small


def compare_to_reference(
    gap: np.ndarray, log_library: np.ndarray, reference: np.ndarray, *, n_neighbors: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Tail fraction and robust z-score of each cell's gap among reference cells of similar depth.

    Returns (trust, z): ``trust`` is the fraction of the comparable reference cells whose gap
    is at least the cell's (a reference cell leaves itself out), in (0, 1]; ``z`` is
    (gap - their median) / (1.4826 x their median absolute deviation).
    """
    ref = np.flatnonzero(reference)
    if len(ref) < 2:
        raise ValueError("At least 2 training cells are needed as the reference.")
    order = ref[np.argsort(log_library[ref], kind="stable")]
    ref_l, ref_g = log_library[order], gap[order]
    k = min(n_neighbors, len(order))
    trust, z = np.empty(len(gap)), np.empty(len(gap))
    for lo in range(0, len(gap), _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        pos = np.searchsorted(ref_l, log_library[sl])
        start = np.clip(pos - k // 2, 0, len(order) - k)
        w = ref_g[start[:, None] + np.arange(k)]  # (cells, k): gaps of the k comparable training cells
        g = gap[sl]
        med = np.median(w, axis=1)
        mad = 1.4826 * np.median(np.abs(w - med[:, None]), axis=1)
        z[sl] = (g - med) / np.maximum(mad, 1e-3)
        at_least = (w >= g[:, None]).sum(1)
        own = reference[sl].astype(int)  # a reference cell sits in its own window: leave it out
        trust[sl] = (1 + at_least - own) / (k + 1 - own)
    return trust, z
