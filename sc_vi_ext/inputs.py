"""What training reads from an AnnData, checked.

The count matrix, its totals, library sizes, batch codes and covariates.

Every check reads the matrix in blocks of rows, so a backed (on-disk) matrix is never
loaded whole; bad input raises an error that says what to do, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from anndata.abc import CSCDataset
from scanpy import logging as logg

from .dataloader import is_on_disk

_CHECK_ROWS = 10_000  # rows read per chunk when checking a matrix


def get_counts(adata: AnnData, layer: str | None):
    """Return the count matrix of ``adata`` (``X`` or ``layers[layer]``), row-sliceable."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); nothing to train on.")
    if layer is None:
        X = adata.X
        if X is None:
            raise ValueError("adata.X is None; pass `layer=` naming the layer that holds raw counts.")
    else:
        if layer not in adata.layers:
            raise KeyError(
                f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers.keys())}); "
                "pass the name of the layer with raw counts, or layer=None to use adata.X."
            )
        X = adata.layers[layer]
    if isinstance(X, CSCDataset):
        raise ValueError("A CSC matrix on disk cannot be read by rows; write it as CSR (X.tocsr()) first.")
    if sp.issparse(X) and X.format == "csc":
        logg.info("    converting CSC counts to CSR for row slicing (a sparse copy)")
        X = X.tocsr()
    elif sp.issparse(X) and X.format != "csr":
        X = X.tocsr()
    elif not (sp.issparse(X) or is_on_disk(X)):
        X = np.asarray(X)
    return X


def row_blocks(X, rows=None, chunk: int = _CHECK_ROWS):
    """Yield (positions, block) over the rows ``rows`` of ``X`` (all when None), ``chunk`` rows at a time.

    Consecutive slices for all rows, sorted fancy indexing for a subset (which a
    backed matrix reads without touching the other rows).
    """
    if rows is None:
        for i in range(0, X.shape[0], chunk):
            stop = min(X.shape[0], i + chunk)
            yield np.arange(i, stop), X[i:stop]
        return
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    for i in range(0, len(rows), chunk):
        pos = rows[i:i + chunk]
        yield pos, X[pos]


def row_totals(X, gene_index=None, rows=None) -> np.ndarray:
    """Total counts per cell (over the columns ``gene_index`` >= 0 when given), read in chunks of rows.

    With ``rows``, only those rows are read and the result (float64, one entry per row of
    ``X``) is NaN elsewhere.
    """
    cols = None if gene_index is None else np.asarray(gene_index)[np.asarray(gene_index) >= 0]
    out = np.full(X.shape[0], np.nan)
    for pos, block in row_blocks(X, rows):
        if cols is not None:
            block = block[:, cols]
        out[pos] = np.asarray(block.sum(axis=1)).ravel()
    return out


# Counts stored as floats carry rounding noise: float64 arithmetic or text round trips
# (pandas/CSV) leave about 1e-11 or less, float32 arithmetic a few units in the last place,
# i.e. a few 1e-7 relative (float32 spacing is 2**-23 = 1.2e-7 times the value). 1e-6
# relative, with an absolute floor of 1e-6 below 1, accepts both with room to spare, while
# normalised or log-transformed values sit about 0.1-0.5 from an integer.
COUNT_RTOL = 1e-6


@dataclass
class CountCheck:
    """What :func:`inspect_counts` found: totals per cell and the float noise that was rounded."""

    totals: np.ndarray  # total (rounded) counts per cell
    n_rounded: int  # values within COUNT_RTOL of an integer but not equal to it
    max_deviation: float  # the largest |x - round(x)| among them
    n_duplicates: int = 0  # CSR entries that repeat a (cell, gene) of the same block: summed into it

    @property
    def read_options(self) -> dict:
        """Return how minibatches of these counts are read (keywords of :class:`~sc_vi_ext.dataloader.Minibatches`)."""
        return {"round_counts": self.n_rounded > 0, "sum_duplicates": self.n_duplicates > 0}


def inspect_counts(X, what: str, gene_index=None, rows=None) -> CountCheck:
    """Validate raw counts chunk by chunk: totals per cell and the float noise to round.

    Values within ``COUNT_RTOL * max(1, |x|)`` of an integer count as that integer (see
    the comment above ``COUNT_RTOL``); the totals are those of the rounded counts, over
    the columns ``gene_index`` >= 0 when given. With ``rows``, only those rows are read
    (tools that apply a stored model to a subset of a large AnnData) and the totals of the
    other rows are NaN. Raises a ValueError that says what to do on NaN/inf, negative or
    non-integer values and on cells without counts.
    """
    cols = None if gene_index is None else np.asarray(gene_index)[np.asarray(gene_index) >= 0]
    totals = np.full(X.shape[0], np.nan)
    n_rounded, max_dev, n_dup = 0, 0.0, 0
    for pos, block in row_blocks(X, rows):
        if not sp.issparse(block):
            block = np.asarray(block)
        elif not block.has_canonical_format:  # a count may be stored in pieces (1 + 1, 0.5 + 0.5): add them up
            nnz, block = block.nnz, block.copy()  # a copy: the AnnData is never modified
            block.sum_duplicates()
            n_dup += nnz - block.nnz
        vals = block.data if sp.issparse(block) else block
        if not np.all(np.isfinite(vals)):
            raise ValueError(f"{what} contains NaN or infinite values; the VAE needs finite raw counts.")
        if vals.size and vals.min() < -COUNT_RTOL:  # -1e-12 is noise around a zero count
            raise ValueError(f"{what} contains negative values; the VAE needs raw (non-negative integer) counts.")
        dev = np.abs(vals - np.rint(vals)) if vals.dtype.kind == "f" else None  # integer storage: integers
        if dev is not None and dev.any():  # non-integers: float noise, or not counts at all
            if np.any(dev > COUNT_RTOL * np.maximum(1.0, np.abs(vals))):
                raise ValueError(
                    f"{what} contains non-integer values: it looks normalised or log-transformed. "
                    "The VAE models raw counts: pass `layer=` with the raw-count layer "
                    "(e.g. adata.layers['counts'] saved before sc.pp.normalize_total)."
                )
            # sum the rounded counts; the AnnData itself is never modified
            n_rounded += int(np.count_nonzero(dev))
            max_dev = max(max_dev, float(dev.max()))
            if sp.issparse(block):
                block = block.copy()
                block.data = np.rint(block.data)
            else:
                block = np.rint(block)  # a new array
        if cols is not None:
            block = block[:, cols]
        totals[pos] = np.asarray(block.sum(axis=1)).ravel()
    n_empty = int((totals == 0).sum())
    if n_empty:
        raise ValueError(
            f"{n_empty} cell(s) have zero total counts in {what}; remove them first, "
            "e.g. sc.pp.filter_cells(adata, min_counts=1)."
        )
    if n_dup:
        logg.info(f"    {what} is a non-canonical CSR matrix: {n_dup} entries repeat a (cell, gene) and are added to "
                  "it in every minibatch; the AnnData is not modified (X.sum_duplicates() makes it canonical)")
    if n_rounded:
        logg.info(f"    rounded {n_rounded} value(s) of {what} within {COUNT_RTOL:g} (relative) of an integer "
                  f"to it (largest deviation {max_dev:.3g}); the AnnData is not modified")
    return CountCheck(totals, n_rounded, max_dev, n_dup)


def check_counts(X, what: str) -> np.ndarray:
    """Validate raw counts (see :func:`inspect_counts`) and return each cell's total count."""
    return inspect_counts(X, what).totals


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


def counts_label(layer: str | None) -> str:
    """Where the counts are, as error messages name them."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


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
                       categorical_keys, continuous_keys) -> TrainingData:
    """Check and read what training needs from ``adata`` (raises on bad input, writes nothing)."""
    require_unique(adata, "var")  # before the counts are read: a quick refusal
    require_unique(adata, "obs")
    X = get_counts(adata, layer)
    what = counts_label(layer)
    codes, categories = batch_codes(adata, batch_key)
    cov, cov_categories = covariate_design(adata, categorical_keys, continuous_keys)
    counts = inspect_counts(X, what)
    log_lib = log_library(adata, counts.totals, size_factor_key)
    return TrainingData(X, codes, categories, cov, cov_categories, counts, log_lib)
