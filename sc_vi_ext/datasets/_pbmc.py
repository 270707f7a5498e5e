"""Real PBMC counts recovered from the file that scanpy ships (no network needed)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData


def pbmc68k() -> AnnData:
    """700 PBMCs x 765 genes of raw counts with 10 labelled cell types.

    Recovered from :func:`scanpy.datasets.pbmc68k_reduced`, whose ``.raw`` holds
    log1p(counts / n_counts * 1e4) of 765 genes: ``expm1(raw) * n_counts / 1e4`` is within
    0.09 of an integer everywhere, so rounding gives the counts back exactly (see
    ``data/README.md``). ``n_counts`` counted all genes of the original matrix, so the
    765-gene totals here are smaller.

    Returns
    -------
    AnnData with CSR integer-valued float32 counts in ``X`` and in ``layers["counts"]``,
    ``obs["bulk_labels"]`` (cell types) and scanpy's other obs columns.
    """
    import scanpy as sc

    ref = sc.datasets.pbmc68k_reduced()
    logn = ref.raw.X
    logn = logn.toarray() if sp.issparse(logn) else np.asarray(logn)
    counts = np.rint(np.expm1(logn.astype(np.float64)) * ref.obs["n_counts"].to_numpy()[:, None] / 1e4)
    X = sp.csr_matrix(counts.astype(np.float32))
    obs = ref.obs[["bulk_labels", "n_genes", "percent_mito", "n_counts", "phase"]].copy()
    adata = AnnData(X=X, obs=obs, var=ref.raw.var[[]].copy())
    adata.layers["counts"] = X.copy()
    adata.uns["bulk_labels_colors"] = list(ref.uns["bulk_labels_colors"])
    return adata
