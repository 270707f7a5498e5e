"""Negative-binomial counts with known cell types, batch effects and marker genes."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    *,
    n_batches: int = 2,
    n_types: int = 5,
    n_markers: int = 20,
    type_sd: float = 0.3,
    dispersion: float = 5.0,
    mean_library: float = 1500.0,
    random_state: int = 0,
) -> AnnData:
    """Simulate NB counts from a low-rank model of cell types and batches.

    Each type has a log-expression profile: a shared baseline, a type-specific deviation of
    every gene (normal with standard deviation ``type_sd``) and ``n_markers`` up-regulated
    genes of its own (lower ``type_sd`` and fewer markers make types harder to separate); each
    batch multiplies every gene by a log-normal factor. Counts are NB with inverse dispersion
    ``dispersion``; library sizes are log-normal around ``mean_library`` (1,500 gives about
    37% non-zero entries at 2,000 genes). Generated in chunks of rows, so large sizes fit
    in memory as CSR.

    Returns
    -------
    AnnData with CSR float32 counts in ``X``, ``obs["cell_type"]``, ``obs["batch"]``,
    ``var["marker_of"]`` (the type a gene marks, or "") and ``uns["simulation"]``.
    """
    settings = {k: v for k, v in locals().items() if k not in ("n_cells", "n_genes")}
    obs, var, blocks = simulate_blocks(n_cells, n_genes, **settings)
    adata = AnnData(X=sp.vstack(list(blocks), format="csr"), obs=obs, var=var)
    adata.uns["simulation"] = settings
    return adata


# the model's settings and their defaults are simulate's
_DEFAULTS = {k: p.default for k, p in inspect.signature(simulate).parameters.items() if p.kind is p.KEYWORD_ONLY}


def simulate_blocks(
    n_cells: int,
    n_genes: int,
    *,
    n_batches: int = _DEFAULTS["n_batches"],
    n_types: int = _DEFAULTS["n_types"],
    n_markers: int = _DEFAULTS["n_markers"],
    type_sd: float = _DEFAULTS["type_sd"],
    dispersion: float = _DEFAULTS["dispersion"],
    mean_library: float = _DEFAULTS["mean_library"],
    random_state: int = _DEFAULTS["random_state"],
    block_rows: int = 20_000,
):
    """Return the data of :func:`simulate` as (obs, var, iterator of CSR blocks of ``block_rows`` rows).

    Stacking the blocks gives ``simulate(...).X`` exactly (with the default ``block_rows``;
    other block sizes draw the same model in another order); writing them one at a time puts
    a large simulation on disk without holding its counts in memory (``python -m benchmarks scale``).
    """
    rng = np.random.default_rng(random_state)
    base = rng.normal(0, 1.0, n_genes) - 1.0
    profiles = np.tile(base, (n_types, 1)) + rng.normal(0, type_sd, (n_types, n_genes))
    marker_of = np.full(n_genes, "", dtype=object)
    genes = rng.permutation(n_genes)
    for t in range(n_types):
        m = genes[t * n_markers:(t + 1) * n_markers]
        profiles[t, m] += rng.uniform(1.5, 3.0, len(m))
        marker_of[m] = f"type_{t}"
    batch_fx = rng.normal(0, 0.5, (n_batches, n_genes))
    cell_type = rng.integers(n_types, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    log_lib = rng.normal(np.log(mean_library), 0.4, n_cells)

    def blocks():
        for lo in range(0, n_cells, block_rows):
            hi = min(n_cells, lo + block_rows)
            logits = profiles[cell_type[lo:hi]] + batch_fx[batch[lo:hi]]
            p = np.exp(logits - logits.max(1, keepdims=True))
            mu = p / p.sum(1, keepdims=True) * np.exp(log_lib[lo:hi, None])
            lam = rng.gamma(dispersion, mu / dispersion)  # NB as a Gamma-Poisson mixture
            yield sp.csr_matrix(rng.poisson(lam).astype(np.float32))

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"marker_of": marker_of.astype(str)}, index=[f"gene_{g}" for g in range(n_genes)])
    return obs, var, blocks()
