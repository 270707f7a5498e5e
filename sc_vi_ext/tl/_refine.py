"""``tl.refine``: semi-amortized inference, each cell's q optimised from the encoder's."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import OPTIMISER_DOC, doc_params
from .._progress import tqdm
from ..diagnostics import elbo_paired, optimize_q
from ..model_store import stored_loader
from ..threads import cpu_threads
from ._shared import check_free
from ._utils import stored_model


@doc_params(opt=OPTIMISER_DOC)
@cpu_threads
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
    {apply_model}

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
    check_free(adata, key, "obsm", f"X_{key}_refined")  # the latent of a model stored under key + "_refined"
    adata = adata.copy() if copy else adata
    start = logg.info(f"refining the latent space of {key!r} on {adata.n_obs} cells")
    gen = torch.Generator(device=dev).manual_seed(random_state)
    means, gains, steps = [], [], []
    loader = stored_loader(adata, key, batch_size=batch_size, device=dev)
    bar = tqdm(total=len(loader), desc="refine", unit="batch", disable=not progress)
    for mb in loader:
        with torch.no_grad():
            q = module.inference(mb.x, mb.batch, mb.cov)
        qs = optimize_q(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, method=method, init=q,
                        n_samples_step=n_samples_step, lr=lr,
                        max_steps=max_steps, window=window, patience=patience, tol=tol, generator=gen)
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
