"""Plumbing shared by the tools: device, train/held-out split, latent means, stored models."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData

from ..acceleration import keep_freed_memory
from ..dataloader import Minibatches
from ..model_store import get_model
from ..module import VAE


def resolve_device(device: str) -> str:
    """``"auto"``: CUDA when available, else the CPU; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def split_indices(n_obs: int, train_size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split that always leaves at least 2 training cells."""
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], not {train_size}.")
    if n_obs < 2:
        raise ValueError(f"Training needs at least 2 cells, the AnnData has {n_obs}.")
    n_train = min(n_obs, max(2, round(train_size * n_obs)))  # round: 0.9 * 200 is 179.99...
    n_val = n_obs - n_train
    perm = rng.permutation(n_obs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@torch.no_grad()
def set_library_prior(module: VAE, log_totals: np.ndarray, codes: np.ndarray | None, *,
                      init_encoder: bool = True, pool_empty: bool = False) -> list[int]:
    """Per-batch mean and variance of log total counts: the prior of a latent library.

    Batches without cells keep their prior, or with ``pool_empty`` get the prior of all the cells
    given; returns the batches without cells. ``init_encoder`` also starts q(l | x) at the data's scale.
    """
    n = module.library_prior_mean.shape[0]
    codes = np.zeros(len(log_totals), dtype=int) if codes is None or n == 1 else codes
    empty = []
    for b in range(n):
        v = log_totals[codes == b]
        if not len(v):
            empty.append(b)
            if not pool_empty:
                continue
            v = log_totals
        module.library_prior_mean[b] = float(v.mean())
        module.library_prior_log_var[b] = float(np.log(max(v.var(), 1e-4)))
    if init_encoder and module.library_encoder is not None:
        # start q(l | x) at the data's scale rather than at log l = 0 (e^0 = one count per cell)
        module.library_encoder.mean.bias.fill_(float(log_totals.mean()))
    return empty


@torch.no_grad()
def latent_means(module: VAE, loader: Minibatches) -> np.ndarray:
    """Return what ``obsm`` holds (:meth:`VAE.representation` of q's mean) for the cells of ``loader``, in order."""
    module.eval()
    out = np.empty((len(loader.indices), module.n_latent), dtype=np.float32)
    pos = 0
    for mb in loader:
        mean, _ = module.inference(mb.x, mb.batch, mb.cov)
        out[pos:pos + len(mb.idx)] = module.representation(mean).cpu().numpy()
        pos += len(mb.idx)
    return out


def stored_model(adata: AnnData, key: str, device: str) -> tuple[VAE, str]:
    """Rebuild the model stored under ``key`` on ``device`` ("auto": CUDA when available).

    Returns the module and the name of the device it is on (for minibatches and generators).
    Also lets the allocator keep freed blocks for reuse (:func:`~sc_vi_ext.acceleration.keep_freed_memory`).
    """
    keep_freed_memory()
    module = get_model(adata, key, device=resolve_device(device))
    return module, str(next(module.parameters()).device)
