"""``tl.log_likelihood``: the IWAE estimate of log p(x) per cell (Burda et al. 2016)."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._progress import tqdm
from ..diagnostics import iwae
from ..model_store import stored_loader
from ..threads import cpu_threads
from ._cells import cell_subset, write_obs_columns
from ._utils import stored_model


@doc_params()
@cpu_threads
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
    {apply_model}

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
    idx = cell_subset(adata, None, None, subset)
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
    written = write_obs_columns(adata, key, idx, {"log_px": np.concatenate(lpx), "log_px_ess": np.concatenate(ess)})
    logg.info("    finished", time=start, deep="added\n    " + ", ".join(map(repr, written)) + " (adata.obs)")
    return adata if copy else None
