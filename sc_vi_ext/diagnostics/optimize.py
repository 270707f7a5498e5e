"""The per-cell optimum q*: the best Gaussian for each cell with the decoder frozen.

Cremer, Li & Duvenaud (2018) measure the amortization gap as L[q*] - L[q], where q* has
its mean and log-variance optimised for the cell alone. We run Adam on the sum of
per-cell ELBOs, vectorised over cells, with a per-cell stopping rule: ELBO estimates are
averaged over windows of steps, and a cell stops when its window mean has not improved
for ``patience`` windows (or at ``max_steps``). Adam is written out here so that a
stopped cell really stops: torch's Adam keeps moving a parameter with zero gradient
through its momentum. Each cell keeps the parameters of its best window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..module import VAE
from .bounds import log_px_given


@dataclass
class QStar:
    mean: torch.Tensor  # (cells, latent_dim)
    log_var: torch.Tensor
    n_steps: torch.Tensor  # optimiser steps each cell took


def optimize_q(
    module: VAE,
    x: torch.Tensor,
    batch: torch.Tensor | None,
    log_library: torch.Tensor,
    *,
    init: str = "encoder",
    n_samples_step: int = 8,
    lr: float = 0.02,
    max_steps: int = 500,
    window: int = 20,
    patience: int = 3,
    tol: float = 0.01,
    generator: torch.Generator,
    cov: torch.Tensor | None = None,
) -> QStar:
    """Optimise (mean, log_var) of q(z) per cell; the module's weights are not changed."""
    was_training = module.training
    module.eval()
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            if init == "encoder":
                mean, log_var = module.inference(x, batch, cov)
            elif init == "prior":
                mean, log_var = module.prior(batch, x.shape[0])
            else:
                raise ValueError(f"init must be 'encoder' or 'prior', not {init!r}")
        params = torch.cat([mean, log_var], 1)  # (cells, 2d)
        n, d = mean.shape
        m1, m2 = torch.zeros_like(params), torch.zeros_like(params)
        best = params.clone()
        best_score = torch.full((n,), -torch.inf, device=x.device)
        win_sum = torch.zeros(n, device=x.device)
        bad = torch.zeros(n, dtype=torch.long, device=x.device)
        steps = torch.zeros(n, dtype=torch.long, device=x.device)
        active = torch.arange(n, device=x.device)
        b1, b2, adam_eps = 0.9, 0.999, 1e-8
        for step in range(1, max_steps + 1):
            # only the cells still moving are evaluated: work shrinks as cells converge
            p = params[active].requires_grad_(True)
            mu, lv = p[:, :d], p[:, d:]
            eps = torch.randn((n_samples_step, len(active), d), generator=generator, device=x.device)
            bt = None if batch is None else batch[active]
            ct = None if cov is None else cov[active]
            rec, _ = log_px_given(module, x[active], bt, log_library[active], mu, lv, eps, ct)
            elbo = rec.mean(0) - module.kl(mu, lv, bt)
            (grad,) = torch.autograd.grad(-elbo.sum(), p)
            with torch.no_grad():
                t = (steps[active] + 1).to(params.dtype)[:, None]
                m1[active] = b1 * m1[active] + (1 - b1) * grad
                m2[active] = b2 * m2[active] + (1 - b2) * grad.pow(2)
                upd = lr * (m1[active] / (1 - b1**t)) / (torch.sqrt(m2[active] / (1 - b2**t)) + adam_eps)
                win_sum[active] += elbo.detach()
                steps[active] += 1
                params[active] = p.detach() - upd
                if step % window == 0:
                    score = win_sum[active] / window
                    improved = score > best_score[active] + tol
                    idx_imp = active[improved]
                    best[idx_imp] = params[idx_imp]
                    best_score[idx_imp] = score[improved]
                    bad[active] = torch.where(improved, 0, bad[active] + 1)
                    win_sum.zero_()
                    active = active[bad[active] < patience]
                    if len(active) == 0:
                        break
        # cells still active at the cap keep their best window too (the last may be noise)
        return QStar(best[:, :d].contiguous(), best[:, d:].contiguous(), steps)
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
        module.train(was_training)
