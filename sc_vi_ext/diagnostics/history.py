"""Gaps over training: a callback for the training loop (``tl.vae(gap_every=N)``)."""

from __future__ import annotations

import numpy as np
import torch

from ..dataloader import Minibatches
from .gaps import decompose


class GapTracker:
    """Every ``every`` epochs, mean amortization and approximation gaps on fixed subsets.

    ``n_cells`` training and ``n_cells`` held-out cells are drawn once (seeded). The
    per-cell optimisation and the IWAE use small budgets so that tracking costs well
    under the training itself; the numbers are for trends (a held-out amortization gap
    that grows while the training one shrinks means the encoder overfits), not for
    reporting: use :func:`sc_vi_ext.tl.amortization_gap` on the final model for that.
    """

    def __init__(self, X, train_idx, val_idx, *, every: int, seed: int, log_library, batch, device, cov=None,
                 round_counts: bool = False, n_cells: int = 64, n_samples: int = 100, n_samples_elbo: int = 32, max_steps: int = 100):
        rng = np.random.default_rng(seed + 1)
        self.every, self.seed = every, seed
        self.kw = {"n_samples": n_samples, "n_samples_elbo": n_samples_elbo, "max_steps": max_steps}
        self.loaders = {}
        for split, idx in (("train", train_idx), ("validation", val_idx)):
            if len(idx):
                sub = np.sort(rng.choice(idx, min(n_cells, len(idx)), replace=False))
                self.loaders[split] = Minibatches(X, sub, log_library=log_library, batch=batch, cov=cov,
                                                  batch_size=len(sub), device=device, round_counts=round_counts)

    def __call__(self, epoch: int, module) -> dict[str, float]:
        if epoch % self.every:
            return {}
        gen = torch.Generator(device=next(module.parameters()).device).manual_seed(self.seed)
        out = {}
        for split, loader in self.loaders.items():
            mb = next(iter(loader))
            res = decompose(module, mb.x, mb.batch, mb.log_library, generator=gen, cov=mb.cov, **self.kw)
            for name in ("amortization_gap", "approximation_gap"):
                out[f"{name}_{split}"] = float(res[name].mean())
        return out
