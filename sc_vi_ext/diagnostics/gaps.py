"""Per-cell decomposition of the inference gap (Cremer, Li & Duvenaud 2018).

The three gaps, per cell::

    amortization gap  = L[q*] - L[q]        what the shared encoder costs
    approximation gap = log p(x) - L[q*]    what the Gaussian family costs
    inference gap     = log p(x) - L[q]     their sum
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..module import VAE
from .bounds import WIDE_SCALE, mixture_iwae
from .optimize import optimize_q

COLUMNS = ("elbo", "elbo_opt", "log_px", "amortization_gap", "approximation_gap")


N_SAMPLES = 128  # importance samples for log p(x) (the tools' default)
N_SAMPLES_ELBO = 32  # common-random-number draws for each of L[q] and L[q*] (the tools' default)


def decompose(
    module: VAE,
    x: torch.Tensor,
    batch: torch.Tensor | None,
    log_library: torch.Tensor,
    *,
    n_samples: int = N_SAMPLES,
    n_samples_elbo: int = N_SAMPLES_ELBO,
    generator: torch.Generator,
    cov: torch.Tensor | None = None,
    **opt_kwargs,
) -> dict[str, np.ndarray]:
    """Bounds and gaps for one minibatch of cells; every value per cell, in nats.

    L[q] and L[q*] are estimated with ``n_samples_elbo`` common random numbers each (the
    same standard-normal draws through both Gaussians), so the gap between them has a
    small standard error; q* is optimised on draws of its own, so L[q*] is estimated with
    fresh noise and stays a lower bound. log p(x) is the IWAE estimate with K =
    max(``n_samples``, 2 ``n_samples_elbo``) importance samples: the ELBOs' draws from q
    and q*, and the rest from q* with its standard deviations widened ``WIDE_SCALE``
    times, weighted by the mixture of the three (multiple importance sampling, unbiased
    for p(x)). Cremer et al. took the larger of two single-proposal estimates; that
    maximum is biased upwards, and a narrow q* alone gives heavy-tailed weights that
    overshoot log p(x) (our quadrature test caught 0.37 nats above the exact value). The
    widened component covers the posterior's tails that q* misses: with 128 samples it gave
    log p(x) closer to a 6,000-sample reference than 500 samples from q and q* alone
    (``python -m benchmarks gap`` measures the bias against such a reference).
    """
    # eval mode throughout (the training loop's callback hands over a module in train mode:
    # BatchNorm would use, and update, statistics of these samples, and dropout would be on)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            q = module.inference(x, batch, cov)
        if opt_kwargs.get("init", "encoder") == "encoder":  # start from the q just computed
            opt_kwargs = {**opt_kwargs, "init": q}
        qs = optimize_q(module, x, batch, log_library, generator=generator, cov=cov, **opt_kwargs)
        m = n_samples_elbo
        comps = [(*q, m, 0), (qs.mean, qs.log_var, m, 0)]
        if n_samples > 2 * m:
            comps.append((qs.mean, qs.log_var + 2 * math.log(WIDE_SCALE), n_samples - 2 * m, 1))
        log_px, ess, se_lpx, (rec_q, rec_opt, *_) = mixture_iwae(module, x, batch, log_library, comps,
                                                                 generator=generator, cov=cov)
    finally:
        module.train(was_training)
    k = rec_q.shape[0]
    l_q = rec_q.mean(0) - module.kl(*q, batch).double()
    l_opt = rec_opt.mean(0) - module.kl(qs.mean, qs.log_var, batch).double()
    se_opt_elbo = rec_opt.std(0) / k**0.5
    out = {
        "elbo": l_q,
        "elbo_opt": l_opt,
        "log_px": log_px,
        "amortization_gap": l_opt - l_q,
        "approximation_gap": log_px - l_opt,
        "elbo_se": rec_q.std(0) / k**0.5,
        "elbo_opt_se": se_opt_elbo,
        "amortization_gap_se": (rec_opt - rec_q).std(0) / k**0.5,
        "approximation_gap_se": torch.sqrt(se_lpx**2 + se_opt_elbo**2),
        "log_px_se": se_lpx,
        "log_px_ess": ess,
        "displacement": torch.linalg.norm((qs.mean - q[0]) * torch.exp(-0.5 * qs.log_var), dim=1),
        "opt_steps": qs.n_steps,
        "library_size": torch.exp(log_library),
    }
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in out.items()}


def summarize(per_cell: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over cells, their standard errors, and failure signals."""
    n = len(per_cell["elbo"])
    out: dict[str, float] = {"n_cells": n}
    for c in (*COLUMNS, "displacement"):
        v = per_cell[c]
        out[f"{c}_mean"] = float(np.mean(v))
        out[f"{c}_se"] = float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    # a gap significantly below zero means a bug or a failed per-cell optimisation
    for g in ("amortization_gap", "approximation_gap"):
        out[f"{g}_frac_negative"] = float(np.mean(per_cell[g] < -3 * per_cell[f"{g}_se"]))
    return out
