"""The count matrix of an AnnData: where it is (``X``, a layer or ``raw``) and its check.

Every check reads the matrix in blocks of rows, so a backed (on-disk) matrix is never
loaded whole; bad input raises an error that says what to do, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from anndata import AnnData
from anndata.abc import CSCDataset
from scanpy import logging as logg

from .dataloader import is_on_disk, read_disk

_CHECK_ROWS = 10_000  # rows read per chunk when checking a matrix


def layer_names(adata: AnnData) -> list[str]:
    """Return the named layers (anndata >= 0.13 also lists ``X`` as the layer ``None``)."""
    return [k for k in adata.layers.keys() if k is not None]


def get_counts(adata: AnnData, layer: str | None, *, use_raw: bool = False):
    """Return the count matrix of ``adata`` (``X``, ``layers[layer]`` or ``raw``), row-sliceable.

    With ``use_raw``, the counts of the genes of ``adata.var_names`` in ``adata.raw`` (scanpy's
    idiom; raw may hold more genes, or the same in another order: a column copy then).
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); nothing to train on.")
    if use_raw:
        X = _raw_counts(adata, layer)
    elif layer is None:
        X = adata.X
        if X is None:
            raise ValueError("adata.X is None; pass `layer=` naming the layer that holds raw counts.")
    else:
        if layer not in adata.layers:
            raise KeyError(
                f"Layer {layer!r} not found in adata.layers (available: {layer_names(adata)}); "
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


def _raw_counts(adata: AnnData, layer: str | None):
    """Return the columns of ``adata.raw.X`` for the genes of ``adata.var_names``."""
    if layer is not None:
        raise ValueError(f"use_raw=True and layer={layer!r} name two places for the counts; pass only one of them.")
    raw = adata.raw
    if raw is None or raw.X is None:
        raise ValueError("use_raw=True, but adata.raw is None; pass `layer=` with the raw counts, or use_raw=False "
                         "to use adata.X.")
    if raw.var_names.equals(adata.var_names):
        return raw.X
    if not raw.var_names.is_unique:
        raise ValueError("adata.raw.var_names are not unique, so the genes of adata.var_names cannot be found in it.")
    pos = raw.var_names.get_indexer(adata.var_names)
    if (pos < 0).any():
        missing = list(adata.var_names[pos < 0][:5])
        raise ValueError(f"{int((pos < 0).sum())} gene(s) of adata.var_names are not in adata.raw (e.g. {missing}); "
                         "use_raw=True reads the counts of adata.var_names from adata.raw.")
    if is_on_disk(raw.X):
        raise ValueError("adata.raw is on disk with other genes than adata.var_names; load it (adata.to_memory()) "
                         "or write the raw counts of these genes to a layer.")
    logg.info(f"    reading the counts of the {adata.n_vars} genes of adata.var_names from adata.raw (a column copy)")
    return raw.X[:, pos]


def raw_holds_counts(adata: AnnData, n_rows: int = 1000) -> bool:
    """Whether ``adata.raw`` looks like raw counts (its first ``n_rows`` cells hold non-negative integers)."""
    raw = adata.raw
    if raw is None or raw.X is None:
        return False
    block = raw.X[: min(n_rows, adata.n_obs)]
    vals = block.data if sp.issparse(block) else np.asarray(block)
    return bool(vals.size and np.all(np.isfinite(vals)) and vals.min() >= 0
                and np.all(np.abs(vals - np.rint(vals)) <= COUNT_RTOL * np.maximum(1.0, np.abs(vals))))


def raw_hint(adata: AnnData, layer: str | None, *, use_raw: bool) -> str:
    """Return what the error on non-count ``adata.X`` adds when ``adata.raw`` holds the counts."""
    if layer is None and not use_raw and raw_holds_counts(adata):
        return (" adata.raw holds raw counts (X normalised and the counts in .raw, as CELLxGENE files have them): "
                "pass use_raw=True to train on them.")
    return ""


def row_blocks(X, rows=None, chunk: int = _CHECK_ROWS):
    """Yield (positions, block) over the rows ``rows`` of ``X`` (all when None), ``chunk`` rows at a time.

    Consecutive slices for all rows, sorted fancy indexing for a subset (which a
    backed matrix reads without touching the other rows).
    """
    if rows is None:
        for i in range(0, X.shape[0], chunk):
            stop = min(X.shape[0], i + chunk)
            yield np.arange(i, stop), read_disk(X, slice(i, stop)) if is_on_disk(X) else X[i:stop]
        return
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    for i in range(0, len(rows), chunk):
        pos = rows[i:i + chunk]
        yield pos, read_disk(X, pos) if is_on_disk(X) else X[pos]


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


def inspect_counts(X, what: str, gene_index=None, rows=None, *, hint=None) -> CountCheck:
    """Validate raw counts chunk by chunk: totals per cell and the float noise to round.

    Values within ``COUNT_RTOL * max(1, |x|)`` of an integer count as that integer (see
    the comment above ``COUNT_RTOL``); the totals are those of the rounded counts, over
    the columns ``gene_index`` >= 0 when given. With ``rows``, only those rows are read
    (tools that apply a stored model to a subset of a large AnnData) and the totals of the
    other rows are NaN. Raises a ValueError that says what to do on NaN/inf, negative or
    non-integer values and on cells without counts; ``hint()``, when given, adds to the message
    on non-integer values (e.g. that ``adata.raw`` holds the counts).
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
                    "(e.g. adata.layers['counts'] saved before sc.pp.normalize_total)." + (hint() if hint else "")
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


def counts_label(layer: str | None, *, use_raw: bool = False) -> str:
    """Where the counts are, as error messages name them."""
    return "adata.raw.X" if use_raw else "adata.X" if layer is None else f"adata.layers[{layer!r}]"
