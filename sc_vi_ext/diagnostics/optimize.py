"""The per-cell optimum q*: the best Gaussian for each cell with the decoder frozen.

Cremer, Li & Duvenaud (2018) measure the amortization gap as L[q*] - L[q], where q* has
its mean and log-variance optimised for the cell alone. Two optimisers of that objective
live here, vectorised over cells, each cell with its own stopping rule:

``"lbfgs"`` (default): sample-average approximation (SAA). Each cell's reparameterisation
    noise is drawn once, in antithetic pairs (+eps, -eps) rescaled so that every latent
    dimension has sample mean 0 and variance 1; the per-cell ELBO then is a deterministic,
    smooth function of (mean, log-variance), exact along each axis for a log-likelihood
    that is quadratic in z. Batched L-BFGS (Nocedal & Wright 2006, Algorithm 7.4, memory
    ``history``) with a per-cell Armijo backtracking line search maximises it, preconditioned
    by a diagonal inverse Hessian (the start's variance for a mean, 2 for a log-variance:
    the first step is that diagonal Newton step: 6.4 instead of 7.7 evaluations per cell,
    and a better q*; as measured on PBMC); a cell stops
    when ``patience`` accepted steps in a row gain less than ``tol`` nats. q* is tuned to
    its own draws, so callers re-estimate L[q*] with fresh noise: the bound stays honest.
``"adam"``: the earlier stochastic optimiser (fresh noise every step, Adam, windows of
    ``window`` steps averaged, a cell stops after ``patience`` windows without improvement
    and keeps its best window). About 4x slower when measured on PBMC; kept as a reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..module import VAE
from ..module.scoring import LogPxGivenZ
from .bounds import log_px_given, sample_chunk

METHODS = ("lbfgs", "adam")
# per-method defaults of optimize_q (and of the tools' parameters that reach it)
MAX_STEPS = {"lbfgs": 60, "adam": 500}  # objective evaluations per cell
PATIENCE = {"lbfgs": 1, "adam": 3}  # quiet steps ("lbfgs") or windows ("adam") before a cell stops
ADAM_DRAWS = 8  # draws per Adam step; "lbfgs" uses 2 x latent_dim whitened draws, at least LBFGS_MIN_DRAWS
LBFGS_MIN_DRAWS = 16


@dataclass
class QStar:
    mean: torch.Tensor  # (cells, latent_dim)
    log_var: torch.Tensor
    n_steps: torch.Tensor  # objective evaluations (each a decoder pass with gradient) per cell
    saa_gain: torch.Tensor | None = None  # "lbfgs": ELBO gained on the cell's own fixed draws, nats


def _neg_elbo(score: LogPxGivenZ, batch, p: torch.Tensor, eps: torch.Tensor):
    """Minus the ELBO of q = N(p[:, :d], exp(p[:, d:])) by the draws ``eps``, and its gradient in p.

    The draws go through the decoder in cache-sized chunks (``sample_chunk``), each chunk's
    gradient accumulated: the same sums as one pass over all draws, 1.5-2x faster.
    """
    k_all, _, d = eps.shape
    p = p.detach().requires_grad_(True)
    mu, lv = p[:, :d], p[:, d:]
    kl = score.module.kl(mu, lv, batch)
    (g,) = torch.autograd.grad(kl.sum(), p)
    f = kl.detach()
    chunk = sample_chunk(k_all, *score.x.shape)
    for lo in range(0, k_all, chunk):
        rec, _ = log_px_given(score, mu, lv, eps[lo:lo + chunk])
        rec = rec.sum(0) / k_all
        (g_rec,) = torch.autograd.grad(rec.sum(), p)
        f -= rec.detach()
        g -= g_rec
    return f, g


def saa_noise(n_samples: int, n_cells: int, d: int, *, generator: torch.Generator, device) -> torch.Tensor:
    """Antithetic draws, (n_samples, cells, d): per cell, sample mean 0 and sample covariance I.

    With n_samples >= 2d the draws are whitened, so the SAA objective integrates every
    quadratic in z exactly (with n_samples = 2d this is the spherical cubature rule of
    degree 3, randomly rotated per cell); with fewer, each dimension is standardised.
    On PBMC, 2d whitened draws gave a better q* in fewer steps than 16 or 32 merely
    standardised ones.
    """
    k = max(1, n_samples // 2)
    half = torch.randn((k, n_cells, d), generator=generator, device=device)
    if k >= d:  # whiten: the sample covariance is exactly I, not only its diagonal
        g = half.permute(1, 0, 2)  # (cells, k, d)
        evals, evecs = torch.linalg.eigh(g.transpose(1, 2) @ g / k)
        w = evecs @ torch.diag_embed(evals.clamp_min(1e-6).rsqrt()) @ evecs.transpose(1, 2)
        half = (g @ w).permute(1, 0, 2)
    else:
        half = half * torch.rsqrt(half.pow(2).mean(0, keepdim=True).clamp_min(1e-6))
    return torch.cat([half, -half])


def _two_loop(g, S, Y, rho, gamma, newest):
    """L-BFGS direction -H g per cell from ring buffers S, Y, rho (history, cells, ...); H0 = diag(gamma)."""
    m = S.shape[0]
    cells = torch.arange(g.shape[0], device=g.device)
    q, alphas = g.clone(), []
    for i in range(m):  # newest pair first; empty slots have rho = 0 and do nothing
        j = (newest - i) % m
        s, y, r = S[j, cells], Y[j, cells], rho[j, cells]
        a = r * (s * q).sum(1)
        q -= a[:, None] * y
        alphas.append((j, a))
    r_ = gamma * q
    for j, a in reversed(alphas):
        s, y, r = S[j, cells], Y[j, cells], rho[j, cells]
        b = r * (y * r_).sum(1)
        r_ += s * (a - b)[:, None]
    return -r_


def _lbfgs(fg, p, scale, *, max_steps: int, tol: float, patience: int, history: int = 6):
    """Minimise ``fg(cells, p) -> (f, grad)`` per cell (rows of ``p``), batched over cells.

    ``scale`` (cells, D): a diagonal estimate of the inverse Hessian, the initial H of every
    L-BFGS update (rescaled by each accepted pair's curvature) and the first step's metric.
    """
    n, D = p.shape
    dev = p.device
    f, g = fg(torch.arange(n, device=dev), p)
    f0 = f.clone()
    S = torch.zeros(history, n, D, device=dev)
    Y, rho = torch.zeros_like(S), torch.zeros(history, n, device=dev)
    gamma = torch.ones(n, device=dev)  # first step: the diagonal Newton step
    direction = -gamma[:, None] * scale * g
    step = torch.ones(n, device=dev)
    n_pairs = torch.zeros(n, dtype=torch.long, device=dev)
    quiet = torch.zeros(n, dtype=torch.long, device=dev)
    evals = torch.ones(n, dtype=torch.long, device=dev)
    active = torch.arange(n, device=dev)
    while len(active) and int(evals[active].max()) < max_steps:
        trial = p[active] + step[active, None] * direction[active]
        f_new, g_new = fg(active, trial)
        evals[active] += 1
        slope = (g[active] * direction[active]).sum(1)
        ok = torch.isfinite(f_new) & torch.isfinite(g_new).all(1) & (f_new <= f[active] + 1e-4 * step[active] * slope)
        acc = active[ok]
        if len(acc):
            s, y = trial[ok] - p[acc], g_new[ok] - g[acc]
            sy = (s * y).sum(1)
            gain = f[acc] - f_new[ok]
            p[acc], f[acc], g[acc] = trial[ok], f_new[ok], g_new[ok]
            good = sy > 1e-10  # curvature condition; other pairs would break the update
            cg, pos = acc[good], n_pairs[acc[good]] % history
            S[pos, cg], Y[pos, cg], rho[pos, cg] = s[good], y[good], 1 / sy[good]
            gamma[cg] = sy[good] / (y[good] * scale[cg] * y[good]).sum(1)
            n_pairs[cg] += 1
            h0 = gamma[acc, None] * scale[acc]
            d_new = _two_loop(g[acc], S[:, acc], Y[:, acc], rho[:, acc], h0, (n_pairs[acc] - 1) % history)
            bad_dir = (d_new * g[acc]).sum(1) >= 0
            d_new[bad_dir] = -h0[bad_dir] * g[acc][bad_dir]
            direction[acc], step[acc] = d_new, 1.0
            quiet[acc] = torch.where(gain < tol, quiet[acc] + 1, 0)
        rej = active[~ok]
        step[rej] *= 0.3
        done = (quiet[active] >= patience) | (step[active] < 1e-6)
        active = active[~done]
    return p, evals, f0 - f


def _adam(fg_stoch, p, *, lr: float, max_steps: int, window: int, patience: int, tol: float):
    """Run the stochastic reference: Adam written out so that a stopped cell really stops."""
    n = p.shape[0]
    dev = p.device
    m1, m2 = torch.zeros_like(p), torch.zeros_like(p)
    best = p.clone()
    best_score = torch.full((n,), -torch.inf, device=dev)
    win_sum = torch.zeros(n, device=dev)
    bad = torch.zeros(n, dtype=torch.long, device=dev)
    steps = torch.zeros(n, dtype=torch.long, device=dev)
    active = torch.arange(n, device=dev)
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    for it in range(1, max_steps + 1):
        f, grad = fg_stoch(active, p[active])
        t = (steps[active] + 1).to(p.dtype)[:, None]
        m1[active] = b1 * m1[active] + (1 - b1) * grad
        m2[active] = b2 * m2[active] + (1 - b2) * grad.pow(2)
        upd = lr * (m1[active] / (1 - b1**t)) / (torch.sqrt(m2[active] / (1 - b2**t)) + adam_eps)
        win_sum[active] -= f
        steps[active] += 1
        p[active] = p[active] - upd
        if it % window == 0:
            score = win_sum[active] / window
            improved = score > best_score[active] + tol
            best[active[improved]] = p[active[improved]]
            best_score[active[improved]] = score[improved]
            bad[active] = torch.where(improved, 0, bad[active] + 1)
            win_sum.zero_()
            active = active[bad[active] < patience]
            if len(active) == 0:
                break
    return best, steps  # cells still active at the cap keep their best window too


def optimize_q(
    module: VAE,
    x: torch.Tensor,
    batch: torch.Tensor | None,
    log_library: torch.Tensor,
    *,
    method: str = "lbfgs",
    init: str | tuple[torch.Tensor, torch.Tensor] = "encoder",
    n_samples_step: int | None = None,
    lr: float = 0.02,
    max_steps: int | None = None,
    window: int = 20,
    patience: int | None = None,
    tol: float = 0.01,
    generator: torch.Generator,
    cov: torch.Tensor | None = None,
) -> QStar:
    """Optimise (mean, log_var) of q(z) per cell; the module's weights are not changed.

    ``init``: ``"encoder"`` (q(z|x)), ``"prior"``, or the start (mean, log_var) itself, e.g. the
    encoder's q when the caller has it already. ``n_samples_step``, ``max_steps`` and
    ``patience`` default per method (``MAX_STEPS``, ``PATIENCE``; draws: 2 x latent_dim,
    at least ``LBFGS_MIN_DRAWS``, for ``"lbfgs"``, ``ADAM_DRAWS`` for ``"adam"``). ``lr`` and
    ``window`` are used by ``"adam"`` only.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    lbfgs = method == "lbfgs"
    max_steps = max_steps or MAX_STEPS[method]
    patience = patience or PATIENCE[method]
    was_training = module.training
    module.eval()
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            if isinstance(init, tuple):
                mean, log_var = init
            elif init == "encoder":
                mean, log_var = module.inference(x, batch, cov)
            elif init == "prior":
                mean, log_var = module.prior(batch, x.shape[0])
            else:
                raise ValueError(f"init must be 'encoder' or 'prior', not {init!r}")
        params = torch.cat([mean, log_var], 1)  # (cells, 2d)
        n, d = mean.shape
        n_samples_step = n_samples_step or (max(LBFGS_MIN_DRAWS, 2 * d) if lbfgs else ADAM_DRAWS)

        score = LogPxGivenZ(module, x, batch, log_library, cov)

        def sub(cells):
            return score.subset(cells), None if batch is None else batch[cells]

        if lbfgs:
            eps = saa_noise(n_samples_step, n, d, generator=generator, device=x.device)
            # inverse curvature: the start's variance for a mean (the posterior's, if the start is
            # good), 2 for a log-variance (the ELBO's curvature in it is 1/2 at any optimum)
            scale = torch.cat([torch.exp(log_var), torch.full_like(log_var, 2.0)], 1)
            params, steps, gain = _lbfgs(lambda c, p: _neg_elbo(*sub(c), p, eps[:, c]), params, scale,
                                         max_steps=max_steps, tol=tol, patience=patience)
        else:
            def fg_stoch(c, p):
                e = torch.randn((n_samples_step, len(c), d), generator=generator, device=x.device)
                return _neg_elbo(*sub(c), p, e)

            gain = None
            params, steps = _adam(fg_stoch, params, lr=lr, max_steps=max_steps, window=window,
                                  patience=patience, tol=tol)
        return QStar(params[:, :d].contiguous(), params[:, d:].contiguous(), steps, gain)
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)
        module.train(was_training)

