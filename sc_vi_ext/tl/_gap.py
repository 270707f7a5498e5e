"""``tl.amortization_gap``: how far the encoder's q is from the best q per cell (Cremer et al. 2018)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import OPTIMISER_DOC, doc_params
from .._progress import tqdm
from ..diagnostics import decompose, summarize
from ..diagnostics.bounds import WIDE_SCALE
from ..diagnostics.gaps import N_SAMPLES, N_SAMPLES_ELBO
from ..model_store import stored_loader
from ..threads import cpu_threads
from ._cells import cell_subset, split_masks, write_obs_columns
from ._shared import GAP_COLUMNS
from ._utils import stored_model


def gap_summary(res: dict) -> str:
    """One line: amortization gap +- s.e. for training and held-out cells (or all cells)."""
    labels = {"train": "training", "validation": "held-out"}
    splits = [s for s in labels if s in res] or ["all"]
    parts = [f"{labels.get(s, s)} {res[s]['amortization_gap_mean']:.2f} ± {res[s]['amortization_gap_se']:.2f} "
             f"(n={res[s]['n_cells']})" for s in splits]
    return "amortization gap, nats/cell: " + ", ".join(parts)


@doc_params(opt=OPTIMISER_DOC, wide_scale=f"{WIDE_SCALE:g}")
@cpu_threads
def amortization_gap(
    adata: AnnData,
    *,
    key: str = "vae",
    n_cells: int | None = 1000,
    n_samples: int = N_SAMPLES,
    n_samples_elbo: int = N_SAMPLES_ELBO,
    init: str = "encoder",
    method: str = "lbfgs",
    max_steps: int | None = None,
    lr: float = 0.02,
    n_samples_step: int | None = None,
    window: int = 20,
    patience: int | None = None,
    tol: float = 0.01,
    batch_size: int = 128,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Decompose each cell's inference gap into amortization and approximation gaps.

    For the trained decoder and a cell x (Cremer, Li & Duvenaud 2018):
    L[q] is the ELBO with the encoder's q(z|x); L[q*] the ELBO with the best Gaussian
    for this cell alone (mean and log-variance optimised with the decoder frozen);
    log p(x) the IWAE estimate (Burda et al. 2016) with ``n_samples`` samples from a mixture
    of the encoder's q, q* and a widened q*. Amortization gap = L[q*] - L[q]; approximation
    gap = log p(x) - L[q*]. L[q] and L[q*] share their random numbers, so each cell's
    gap has a small standard error, which is reported. The IWAE estimate is a lower bound
    on log p(x) in expectation, so the approximation gap is, if anything, underestimated.

    Parameters
    ----------
    {adata}
    {key}
    n_cells
        Random subset of cells to evaluate (seeded; drawn from training and held-out
        cells alike); None for all.
    n_samples
        Importance samples K for log p(x): the ``n_samples_elbo`` draws of each ELBO, and
        the rest from q* with its standard deviations widened {wide_scale} times (K grows to
        2 ``n_samples_elbo`` when smaller).
    n_samples_elbo
        Draws for each of L[q] and L[q*], common random numbers (the same standard-normal
        draws through both), at least 2.
    init
        Start of the per-cell optimisation: ``"encoder"`` (q(z|x)) or ``"prior"``.
    {opt}
    {apply_model}

    Returns
    -------
    None, or a copy with ``copy=True``; writes (NaN for cells not evaluated)

    ``adata.obs[key + "_elbo"]``, ``[key + "_elbo_opt"]``, ``[key + "_log_px"]``
        L[q], L[q*] and log p(x) per cell, nats.
    ``adata.obs[key + "_amortization_gap"]``, ``[key + "_approximation_gap"]``
        The gaps, nats; ``[key + "_amortization_gap_se"]`` and ``[key + "_approximation_gap_se"]``
        are each cell's standard errors.
    ``adata.obs[key + "_library_size"]``
        The library size the model used for the cell (total counts, or the size factor);
        :func:`sc_vi_ext.pl.amortization_gap` plots the gap against it.
    ``adata.uns[key]["amortization_gap"]``
        ``params``, and for ``"train"``, ``"validation"`` and ``"all"`` cells: means and
        standard errors of each bound and gap, the fraction of cells with a gap below
        zero by more than 3 standard errors, and the mean latent displacement
        ||mu* - mu|| / sigma*.
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "copy")}
    if not (isinstance(n_samples_elbo, int) and n_samples_elbo >= 2 and isinstance(n_samples, int) and n_samples >= 1):
        raise ValueError(f"n_samples_elbo must be an integer >= 2 and n_samples a positive integer, not "
                         f"{n_samples_elbo!r} and {n_samples!r}.")
    module, dev = stored_model(adata, key, device)
    adata = adata.copy() if copy else adata
    rng = np.random.default_rng(random_state)
    idx = cell_subset(adata, n_cells, rng)
    start = logg.info(f"computing amortization gap of {key!r} on {len(idx)} cells")
    gen = torch.Generator(device=dev).manual_seed(random_state)
    opt = {"init": init, "method": method, "max_steps": max_steps, "lr": lr, "n_samples_step": n_samples_step,
           "window": window, "patience": patience, "tol": tol}
    parts = []
    loader = stored_loader(adata, key, idx, batch_size=batch_size, device=dev)
    masks = split_masks(adata, key, idx)  # every check before anything is written
    # a bar over an iterable closes itself at the end; this one stays open for the result line
    bar = tqdm(total=len(loader), desc="amortization gap", unit="batch", disable=not progress)
    for mb in loader:
        parts.append(decompose(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, n_samples=n_samples,
                               n_samples_elbo=n_samples_elbo, generator=gen, **opt))
        bar.update()
    per_cell = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    written = write_obs_columns(adata, key, idx, {c: per_cell[c] for c in GAP_COLUMNS})
    adata.uns[key]["amortization_gap"] = {
        "params": params,
        **{s: summarize({k: v[m] for k, v in per_cell.items()}) for s, m in masks.items() if m.sum() > 0},
    }
    lone = [s for s, m in masks.items() if m.sum() == 1]
    if lone:
        warnings.warn(f"amortization_gap: one evaluated cell only among the {' and '.join(map(repr, lone))} cells, "
                      "so the standard errors there cannot be estimated and are NaN; evaluate more cells "
                      "(n_cells=None: all).", UserWarning, stacklevel=3)  # the line of the user's call
    text = gap_summary(adata.uns[key]["amortization_gap"])
    bar.set_postfix_str(text, refresh=True)  # the bar's last line holds the result
    bar.close()
    logg.info(f"    {text}")
    for split, r in adata.uns[key]["amortization_gap"].items():
        if split in ("train", "validation"):
            logg.info(f"    {split}: approximation gap {r['approximation_gap_mean']:.2f} ± "
                      f"{r['approximation_gap_se']:.2f} nats/cell")
    logg.info("    finished", time=start,
              deep="added\n    " + ", ".join(f"{c!r}" for c in written)
              + " (adata.obs)\n    'amortization_gap' (adata.uns['" + key + "'])")
    return adata if copy else None
