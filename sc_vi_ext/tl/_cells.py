"""Which cells a tool evaluates, which of them were held out, and writing per-cell columns."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from ..model_store import held_out_mask


def cell_subset(adata: AnnData, n_cells: int | None, rng: np.random.Generator, subset=None) -> np.ndarray:
    if subset is not None:
        idx = np.asarray(subset)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx
        if idx.dtype.kind not in "iu":
            idx = adata.obs_names.get_indexer(idx)
            if (idx < 0).any():
                raise KeyError("Some cells in `subset` are not in adata.obs_names.")
        return np.sort(idx)
    if n_cells is None or n_cells >= adata.n_obs:
        return np.arange(adata.n_obs)
    return np.sort(rng.choice(adata.n_obs, n_cells, replace=False))


def split_masks(adata: AnnData, key: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    val = held_out_mask(adata, key)  # by obs name: also right on a subset of the AnnData
    return {"train": ~val[idx], "validation": val[idx], "all": np.ones(len(idx), bool)}


def write_obs_columns(adata: AnnData, key: str, idx: np.ndarray, values: dict[str, np.ndarray]) -> list[str]:
    cols = []
    for name, v in values.items():
        col = np.full(adata.n_obs, np.nan)
        col[idx] = v
        adata.obs[f"{key}_{name}"] = col
        cols.append(f"{key}_{name}")
    return cols
