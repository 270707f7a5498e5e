"""``tl.amortization_gap``, ``tl.refine`` and ``tl.log_likelihood``: how good the inference is."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._progress import tqdm
from ..diagnostics import COLUMNS, decompose, elbo_paired, iwae, optimize_q, summarize
from ..model_store import held_out_mask, stored_loader
from ._utils import stored_model

_OPT_DOC = """\
method
    Per-cell optimiser of q*: ``"lbfgs"`` (sample-average approximation: each cell's
    noise fixed, L-BFGS with a line search; converges in 10-20 evaluations) or ``"adam"``
    (the earlier stochastic optimiser, about 4x slower; kept for comparison).
max_steps
    Cap on objective evaluations (decoder passes with gradient) per cell; None: 60 for
    ``"lbfgs"``, 500 for ``"adam"``.
lr
    Adam learning rate (``"adam"`` only).
n_samples_step
    Draws per evaluation of a cell's ELBO; None: 2 x latent dimension (at least 16) for
    ``"lbfgs"``, 8 for ``"adam"``.
window
    Steps per window, over which ``"adam"`` averages a cell's ELBO estimates.
patience
    A cell stops after this many steps (``"lbfgs"``; None: 1) or windows (``"adam"``;
    None: 3) that gain less than ``tol``.
tol
    Improvement (nats) that counts."""


def _subset(adata: AnnData, n_cells: int | None, rng: np.random.Generator, subset=None) -> np.ndarray:
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


def _split_masks(adata: AnnData, key: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    val = held_out_mask(adata, key)  # by obs name: also right on a subset of the AnnData
    return {"train": ~val[idx], "validation": val[idx], "all": np.ones(len(idx), bool)}


def _write_obs(adata: AnnData, key: str, idx: np.ndarray, values: dict[str, np.ndarray]) -> list[str]:
    cols = []
    for name, v in values.items():
        col = np.full(adata.n_obs, np.nan)
        col[idx] = v
        adata.obs[f"{key}_{name}"] = col
        cols.append(f"{key}_{name}")
    return cols


def _gap_summary(res: dict) -> str:
    """One line: amortization gap +- s.e. for training and held-out cells (or all cells)."""
    labels = {"train": "training", "validation": "held-out"}
    splits = [s for s in labels if s in res] or ["all"]
    parts = [f"{labels.get(s, s)} {res[s]['amortization_gap_mean']:.2f} ± {res[s]['amortization_gap_se']:.2f} "
             f"(n={res[s]['n_cells']})" for s in splits]
    return "amortization gap, nats/cell: " + ", ".join(parts)


@doc_params(opt=_OPT_DOC)
def amortization_gap(
    adata: AnnData,
    *,
    key: str = "vae",
    n_cells: int | None = 1000,
    n_samples: int = 500,
    n_samples_elbo: int | None = None,
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
    log p(x) the IWAE estimate (Burda et al. 2016) with ``n_samples`` samples and the
    equal mixture of the encoder's q and q* as proposal. Amortization gap = L[q*] - L[q]; approximation
    gap = log p(x) - L[q*]. L[q] and L[q*] share their random numbers, so each cell's
    gap has a small standard error, which is reported.

    Parameters
    ----------
    {adata}
    {key}
    n_cells
        Random subset of cells to evaluate (seeded; drawn from training and held-out
        cells alike); None for all.
    n_samples
        Importance samples K for log p(x), half from q and half from q*; the same draws
        (K / 2 common random numbers) estimate L[q] and L[q*].
    n_samples_elbo
        At least this many draws for each of L[q] and L[q*] (K grows to twice this when
        larger); None: K / 2.
    init
        Start of the per-cell optimisation: ``"encoder"`` (q(z|x)) or ``"prior"``.
    {opt}
    {batch_size}
    {random_state}
    {device}
    {progress}
    {copy}

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
    module, dev = stored_model(adata, key, device)
    adata = adata.copy() if copy else adata
    rng = np.random.default_rng(random_state)
    idx = _subset(adata, n_cells, rng)
    start = logg.info(f"computing amortization gap of {key!r} on {len(idx)} cells")
    gen = torch.Generator(device=dev).manual_seed(random_state)
    opt = {"init": init, "method": method, "max_steps": max_steps, "lr": lr, "n_samples_step": n_samples_step,
           "window": window, "patience": patience, "tol": tol}
    parts = []
    loader = stored_loader(adata, key, idx, batch_size=batch_size, device=dev)
    masks = _split_masks(adata, key, idx)  # every check before anything is written
    # a bar over an iterable closes itself at the end; this one stays open for the result line
    bar = tqdm(total=len(loader), desc="amortization gap", unit="batch", disable=not progress)
    for mb in loader:
        parts.append(decompose(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, n_samples=n_samples,
                               n_samples_elbo=n_samples_elbo, generator=gen, **opt))
        bar.update()
    per_cell = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cols = (*COLUMNS, "amortization_gap_se", "approximation_gap_se", "library_size")
    written = _write_obs(adata, key, idx, {c: per_cell[c] for c in cols})
    adata.uns[key]["amortization_gap"] = {
        "params": params,
        **{s: summarize({k: v[m] for k, v in per_cell.items()}) for s, m in masks.items() if m.sum() > 0},
    }
    text = _gap_summary(adata.uns[key]["amortization_gap"])
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


@doc_params(opt=_OPT_DOC)
def refine(
    adata: AnnData,
    *,
    key: str = "vae",
    method: str = "lbfgs",
    max_steps: int | None = None,
    lr: float = 0.02,
    n_samples_step: int | None = None,
    window: int = 20,
    patience: int | None = None,
    tol: float = 0.01,
    n_samples_elbo: int = 64,
    batch_size: int = 256,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Semi-amortized inference: refine each cell's q from the encoder with the decoder frozen.

    The encoder's q(z|x) is the starting point of a per-cell optimisation of the ELBO (the
    same optimiser as L[q*] in :func:`amortization_gap`), which closes the amortization
    gap. All cells, in minibatches.

    Parameters
    ----------
    {adata}
    {key}
    {opt}
    n_samples_elbo
        Samples (common random numbers) to estimate the ELBO gained per cell.
    {batch_size}
    {random_state}
    {device}
    {progress}
    {copy}

    Returns
    -------
    None, or a copy with ``copy=True``; writes

    ``adata.obsm["X_" + key + "_refined"]``
        Refined latent means mu*, float32.
    ``adata.obs[key + "_refine_gain"]``
        ELBO gained per cell, L[q*] - L[q] in nats.
    ``adata.uns[key]["refine"]``
        ``params``, ``n_cells``, ``elbo_gain_mean``, ``elbo_gain_median``, ``steps_mean``, ``steps_max``.
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "copy")}
    module, dev = stored_model(adata, key, device)
    adata = adata.copy() if copy else adata
    start = logg.info(f"refining the latent space of {key!r} on {adata.n_obs} cells")
    gen = torch.Generator(device=dev).manual_seed(random_state)
    means, gains, steps = [], [], []
    loader = stored_loader(adata, key, batch_size=batch_size, device=dev)
    bar = tqdm(total=len(loader), desc="refine", unit="batch", disable=not progress)
    for mb in loader:
        qs = optimize_q(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, method=method,
                        n_samples_step=n_samples_step, lr=lr,
                        max_steps=max_steps, window=window, patience=patience, tol=tol, generator=gen)
        with torch.no_grad():
            q = module.inference(mb.x, mb.batch, mb.cov)
        (l_q, _), (l_opt, _) = elbo_paired(module, mb.x, mb.batch, mb.log_library, [q, (qs.mean, qs.log_var)],
                                           cov=mb.cov, n_samples=n_samples_elbo, generator=gen)
        means.append(module.representation(qs.mean).cpu().numpy())
        gains.append((l_opt - l_q).cpu().numpy())
        steps.append(qs.n_steps.cpu().numpy())
        bar.update()
    gain, steps = np.concatenate(gains), np.concatenate(steps)
    adata.obsm[f"X_{key}_refined"] = np.concatenate(means).astype(np.float32)
    adata.obs[f"{key}_refine_gain"] = gain
    adata.uns[key]["refine"] = {
        "params": params, "n_cells": adata.n_obs, "elbo_gain_mean": float(gain.mean()),
        "elbo_gain_median": float(np.median(gain)), "steps_mean": float(steps.mean()), "steps_max": int(steps.max()),
    }
    bar.set_postfix_str(f"ELBO gained {gain.mean():.2f} nats/cell on average", refresh=True)
    bar.close()
    logg.info(f"    ELBO gained {gain.mean():.2f} nats/cell on average, {steps.mean():.0f} steps per cell")
    logg.info("    finished", time=start, deep=f"added\n    'X_{key}_refined' (adata.obsm)\n"
              f"    '{key}_refine_gain' (adata.obs)\n    'refine' (adata.uns['{key}'])")
    return adata if copy else None


@doc_params()
def log_likelihood(
    adata: AnnData,
    *,
    key: str = "vae",
    n_samples: int = 1000,
    subset=None,
    batch_size: int = 128,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """IWAE estimate of log p(x) per cell (Burda et al. 2016), the encoder as proposal.

    Parameters
    ----------
    {adata}
    {key}
    n_samples
        Importance samples K; the bound tightens as K grows.
    subset
        Cells to evaluate: a boolean mask, positions or obs names; all when None.
    {batch_size}
    {random_state}
    {device}
    {progress}
    {copy}

    Returns
    -------
    None, or a copy with ``copy=True``; writes (NaN for cells not evaluated)

    ``adata.obs[key + "_log_px"]``
        log p(x) estimate, nats.
    ``adata.obs[key + "_log_px_ess"]``
        Effective sample size of the importance weights (near K: q is close to the posterior).
    """
    module, dev = stored_model(adata, key, device)
    adata = adata.copy() if copy else adata
    idx = _subset(adata, None, None, subset)
    start = logg.info(f"computing log p(x) of {key!r} on {len(idx)} cells with {n_samples} importance samples")
    gen = torch.Generator(device=dev).manual_seed(random_state)
    lpx, ess = [], []
    for mb in tqdm(stored_loader(adata, key, idx, batch_size=batch_size, device=dev), desc="log p(x)",
                   unit="batch", disable=not progress, leave=False):
        with torch.no_grad():
            q = module.inference(mb.x, mb.batch, mb.cov)
        lp, e, _ = iwae(module, mb.x, mb.batch, mb.log_library, *q, n_samples=n_samples, generator=gen, cov=mb.cov)
        lpx.append(lp.cpu().numpy())
        ess.append(e.cpu().numpy())
    written = _write_obs(adata, key, idx, {"log_px": np.concatenate(lpx), "log_px_ess": np.concatenate(ess)})
    logg.info("    finished", time=start, deep="added\n    " + ", ".join(map(repr, written)) + " (adata.obs)")
    return adata if copy else None
