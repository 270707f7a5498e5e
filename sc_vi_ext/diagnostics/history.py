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
                 round_counts: bool = False, sum_duplicates: bool = False, n_cells: int = 64, n_samples: int = 100,
                 max_steps: int = 100):
        rng = np.random.default_rng(seed + 1)
        self.every, self.seed = every, seed
        self.kw = {"n_samples": n_samples, "max_steps": max_steps}
        self.loaders = {}
        for split, idx in (("train", train_idx), ("validation", val_idx)):
            if len(idx):
                sub = np.sort(rng.choice(idx, min(n_cells, len(idx)), replace=False))
                self.loaders[split] = Minibatches(X, sub, log_library=log_library, batch=batch, cov=cov,
                                                  batch_size=len(sub), device=device, round_counts=round_counts,
                                                  sum_duplicates=sum_duplicates)

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
                out[f"{name}_{split}_se"] = float(res[name].std(ddof=1) / np.sqrt(len(res[name])))
        return out


def overfitting_epochs(history: dict, *, ratio: float = 2.0, n_se: float = 2.0) -> np.ndarray:
    """Flag the recorded epochs where the held-out amortization gap is well beyond the training one.

    Well beyond: above ``ratio`` times the training gap and above it by more than ``n_se``
    combined standard errors. False where nothing was recorded.
    """
    tr = np.asarray(history["amortization_gap_train"], dtype=float)
    va = np.asarray(history["amortization_gap_validation"], dtype=float)
    se_t = np.asarray(history.get("amortization_gap_train_se", np.zeros_like(tr)), dtype=float)
    se_v = np.asarray(history.get("amortization_gap_validation_se", np.zeros_like(va)), dtype=float)
    rec = np.isfinite(tr) & np.isfinite(va)
    with np.errstate(invalid="ignore"):
        return rec & (va > ratio * np.maximum(tr, 0)) & (va - tr > n_se * np.nan_to_num(np.hypot(se_t, se_v)))


def overfitting_alarm(history: dict, *, best_epoch: int | None = None, ratio: float = 2.0,
                      n_se: float = 2.0) -> str | None:
    """Return a warning text when the held-out amortization gap has grown well beyond the training one.

    Checked (see :func:`overfitting_epochs`) at the last recorded epoch up to ``best_epoch``,
    whose weights are the ones kept. Returns None when all is well.
    """
    if "amortization_gap_validation" not in history:
        return None
    epochs = np.asarray(history["epoch"])
    tr = np.asarray(history["amortization_gap_train"], dtype=float)
    va = np.asarray(history["amortization_gap_validation"], dtype=float)
    se_t = np.asarray(history.get("amortization_gap_train_se", np.full_like(tr, np.nan)), dtype=float)
    se_v = np.asarray(history.get("amortization_gap_validation_se", np.full_like(va, np.nan)), dtype=float)
    bad = overfitting_epochs(history, ratio=ratio, n_se=n_se)
    upto = np.isfinite(tr) & np.isfinite(va) & (epochs <= (best_epoch if best_epoch else epochs.max()))
    if not upto.any():
        return None
    i = np.flatnonzero(upto)[-1]
    if not bad[i]:
        return None
    first = int(epochs[np.flatnonzero(bad)[0]])
    return (
        f"The encoder overfits its training cells: at epoch {int(epochs[i])} the held-out cells' amortization gap "
        f"is {va[i]:.2f} ± {se_v[i]:.2f} nats/cell, {va[i] / max(tr[i], 1e-9):.1f}x the training cells' "
        f"({tr[i]:.2f} ± {se_t[i]:.2f}); first seen at epoch {first}. New cells get worse latent positions than "
        "the training ELBO suggests. Consider fewer epochs or early stopping, more cells, a smaller encoder "
        "(n_hidden, dropout); check cells with sv.tl.trust_score and improve them with sv.tl.refine. "
        "sv.pl.gap_history(adata) shows the gaps over training."
    )
