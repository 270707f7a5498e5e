"""What training reads from an AnnData besides the counts, checked.

Library sizes, batch codes, covariates and unique names; the count matrix itself (where it is,
and its check) is in :mod:`sc_vi_ext.counts`, whose names are also importable from here.
Bad input raises an error that says what to do, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from .counts import (
    COUNT_RTOL,
    CountCheck,
    check_counts,
    counts_label,
    get_counts,
    inspect_counts,
    raw_hint,
    raw_holds_counts,
    row_blocks,
    row_totals,
)

__all__ = [
    "COUNT_RTOL", "CountCheck", "TrainingData", "batch_codes", "batch_codes_as", "check_counts",
    "counts_label", "covariate_design", "get_counts", "inspect_counts", "log_library", "raw_hint", "raw_holds_counts",
    "read_training_data", "require_unique", "row_blocks", "row_totals",
]


def log_library(adata: AnnData, totals: np.ndarray, size_factor_key: str | None) -> np.ndarray:
    """Log library size per cell: log total counts, or log ``obs[size_factor_key]`` when given."""
    if size_factor_key is None:
        return np.log(totals).astype(np.float32)
    if size_factor_key not in adata.obs:
        raise KeyError(f"size_factor_key {size_factor_key!r} is not a column of adata.obs.")
    sf = adata.obs[size_factor_key].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(sf)) or (sf <= 0).any():
        raise ValueError(f"adata.obs[{size_factor_key!r}] must be positive and finite for every cell.")
    return np.log(sf).astype(np.float32)


def batch_codes(adata: AnnData, batch_key: str | None) -> tuple[np.ndarray | None, list[str]]:
    """Integer batch codes and the category names (None and [] without a batch key)."""
    if batch_key is None:
        return None, []
    if batch_key not in adata.obs:
        raise KeyError(f"batch_key {batch_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
    col = adata.obs[batch_key]
    if col.isna().any():
        raise ValueError(f"adata.obs[{batch_key!r}] has missing values; fill or drop those cells first.")
    cat = pd.Categorical(col.astype(str))
    return cat.codes.astype(np.int64), [str(c) for c in cat.categories]


def batch_codes_as(adata: AnnData, batch_key: str | None, known: list) -> tuple[np.ndarray | None, list]:
    """Batch codes in the order of a trained model's categories ``known``, unseen ones after them.

    Returns the codes (None without ``batch_key``) and the categories ``known`` lacks.
    """
    codes, cats = batch_codes(adata, batch_key)
    if codes is None:
        return None, []
    new = [c for c in cats if c not in known]
    lookup = {c: i for i, c in enumerate(list(known) + new)}
    return np.array([lookup[c] for c in cats], dtype=np.int64)[codes], new


def group_labels(adata: AnnData, groupby: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``obs[groupby]`` as strings, a missing value as "nan" whatever the pandas version, and the missing mask.

    (pandas 3 keeps missing values missing through ``astype(str)``; pandas 2 writes "nan".)
    """
    col = adata.obs[groupby]
    missing = col.isna().to_numpy()
    return np.where(missing, "nan", col.astype(object).to_numpy()).astype(str), missing


def covariate_design(adata: AnnData, categorical_keys, continuous_keys, categories: dict | None = None):
    """Dense float32 design of extra covariates: one-hot per categorical key, then continuous keys.

    ``categories`` (from training) fixes the one-hot columns; new categories are an error.
    Returns (design or None, categories used).
    """
    categorical_keys, continuous_keys = list(categorical_keys or []), list(continuous_keys or [])
    for k in categorical_keys + continuous_keys:
        if k not in adata.obs:
            raise KeyError(f"Covariate {k!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
    cols, used = [], {}
    for k in categorical_keys:
        values = adata.obs[k].astype(str).to_numpy()
        cats = list(categories[k]) if categories else sorted(set(values))
        unknown = sorted(set(values) - set(cats))
        if unknown:
            raise ValueError(f"adata.obs[{k!r}] has categories {unknown} not seen in training.")
        lookup = {c: i for i, c in enumerate(cats)}
        onehot = np.zeros((adata.n_obs, len(cats)), dtype=np.float32)
        onehot[np.arange(adata.n_obs), [lookup[v] for v in values]] = 1
        cols.append(onehot)
        used[k] = cats
    for k in continuous_keys:
        v = adata.obs[k].to_numpy(dtype=np.float32)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"adata.obs[{k!r}] has NaN or infinite values.")
        cols.append(v[:, None])
    return (np.concatenate(cols, 1) if cols else None), used


_WHY_UNIQUE = {"var": "a model is bound to its genes by name", "obs": "held-out cells are stored by name"}


def require_unique(adata: AnnData, axis: str) -> None:
    """Refuse duplicate ``var_names`` (``axis="var"``) or ``obs_names`` (``"obs"``), saying how to fix them."""
    names = adata.var_names if axis == "var" else adata.obs_names
    if not names.is_unique:
        dup = list(names[names.duplicated()].unique()[:5])
        raise ValueError(f"adata.{axis}_names are not unique (e.g. {dup}): {_WHY_UNIQUE[axis]}; "
                         f"run adata.{axis}_names_make_unique() first.")


@dataclass
class TrainingData:
    """The counts and covariates of an AnnData, checked (what :func:`read_training_data` returns)."""

    X: object
    codes: np.ndarray | None
    categories: list
    cov: np.ndarray | None
    cov_categories: dict
    counts: CountCheck
    log_lib: np.ndarray


def read_training_data(adata: AnnData, *, layer: str | None, batch_key: str | None, size_factor_key: str | None,
                       categorical_keys, continuous_keys, use_raw: bool = False) -> TrainingData:
    """Check and read what training needs from ``adata`` (raises on bad input, writes nothing)."""
    require_unique(adata, "var")  # before the counts are read: a quick refusal
    require_unique(adata, "obs")
    X = get_counts(adata, layer, use_raw=use_raw)
    what = counts_label(layer, use_raw=use_raw)
    codes, categories = batch_codes(adata, batch_key)
    cov, cov_categories = covariate_design(adata, categorical_keys, continuous_keys)
    counts = inspect_counts(X, what, hint=lambda: raw_hint(adata, layer, use_raw=use_raw))
    log_lib = log_library(adata, counts.totals, size_factor_key)
    return TrainingData(X, codes, categories, cov, cov_categories, counts, log_lib)
