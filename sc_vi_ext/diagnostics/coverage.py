"""Reference coverage: does the reference model explain a cell? Per-cell evidence from the generative model.

Four statistics per cell, each larger when the reference explains the cell worse:

``model_miss``
    Deviance per count, 2 (log p(x | x) - log p(x | z*)) / total counts, at the cell's own
    optimum z* (the maximum of log p(x | z) + log p(z) from the encoder's mean, decoder frozen):
    how much of the cell the decoder cannot reproduce even with the best latent position.
``programme``
    The mean of the ``n_top`` largest per-gene robust z-scores of the signed deviance residuals
    at z*, each gene against the same gene in reference cells: a few genes far above anything
    the decoder produces (a new expression programme).
``latent_novelty``
    Mean distance in the latent space to the ``n_neighbors`` nearest reference training cells.
``encoder_miss``
    log p(x, z*) - log p(x, mu): the joint density that refinement gains over the encoder's
    mean, an encoder miss that refinement closes (a point estimate of the amortization gap).

Each statistic is made depth-free (a robust z-score against the calibration cells nearest in
log library size, :func:`~sc_vi_ext.diagnostics.trust.compare_to_reference`) and turned into an
upper-tail p-value against the calibration cells (the reference's held-out cells): empirical in
the bulk, an exponential tail fitted to the top ``TAIL`` of the calibration cells beyond it,
so that p-values stay resolved past the most extreme calibration cell (batches the reference
never saw first lose their batch-wide offset, see :func:`combine`). The p-values are
combined by Fisher's method and the combination is calibrated the same way: on the
calibration cells the coverage is close to uniform, so a threshold ``alpha`` flags about
``alpha`` of typical reference cells.
"""

from __future__ import annotations

import numpy as np
import torch

from ..module import VAE
from ..module.scoring import LogPxGivenZ
from .optimize import _lbfgs
from .trust import compare_to_reference

COMPONENTS = ("model_miss", "programme", "latent_novelty", "encoder_miss")  # the default coverage's evidence
LOCAL = ("neighbourhood",)  # in the coverage where enough held-out cells calibrate it
SHARED = ("common_shift",)  # in the coverage where the query holds enough cells to find its shared direction
GROUP = ("abundance",)  # in the coverage: where query cells crowd a place the reference has few cells
EXTRA = ("latent_density",)  # reported; in the coverage only on request
OPTIONAL = ("label_uncertainty",)  # with reference labels only; like EXTRA
# Weights in Fisher's combination: the per-cell components all read the same residuals and move together,
# the neighbourhood and the abundance are each one summary of many cells; each weighs as much as the four
# per-cell ones together. The common shift weighs twice that (chosen on the benchmark: docs/coverage.md)
SUMMARY_WEIGHT = float(len(COMPONENTS))
WEIGHTS = {**dict.fromkeys(GROUP + LOCAL, SUMMARY_WEIGHT), **dict.fromkeys(SHARED, 2 * SUMMARY_WEIGHT)}
TAIL = 0.1  # share of calibration cells whose exceedances fit the exponential tail
MIN_SCALE = 1.0  # floor of a gene's residual scale: a deviance residual of a well-fitted gene has sd ~ 1


def _refine_point(module: VAE, score: LogPxGivenZ, batch, mean, log_var, *, max_steps: int):
    """z* = argmax log p(x | z) + log p(z) per cell by batched L-BFGS from ``mean``; returns z* and the gain."""
    def fg(cells, p):
        p = p.detach().requires_grad_(True)
        b = None if batch is None else batch[cells]
        f = -(score.subset(cells)(p[None])[0] + module.log_prior(p, b))
        (g,) = torch.autograd.grad(f.sum(), p)
        return f.detach(), g

    scale = torch.exp(log_var)  # the encoder's variance: the inverse curvature of the log joint, roughly
    z, _, gain = _lbfgs(fg, mean.clone(), scale, max_steps=max_steps, tol=0.01, patience=1)
    return z, gain


def deviance_residuals(module: VAE, x: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gene unit deviance of ``x`` under the model's mean and dispersion, and its signed root.

    NB (or Poisson without a dispersion) with the model's mean, (1 - dropout) mu for ZINB:
    d = 2 [x log(x / m) - (x + theta) log((x + theta) / (m + theta))].
    """
    m = params["mu"]
    if params.get("zi_logits") is not None and module.likelihood == "zinb":
        m = m * torch.sigmoid(-params["zi_logits"])
    m = m.clamp_min(1e-8)
    xlog = torch.where(x > 0, x * torch.log(x.clamp_min(1e-8) / m), torch.zeros_like(x))
    theta = params.get("theta")
    if theta is None:
        d = 2 * (xlog - (x - m))
    else:
        theta = theta.expand_as(m)
        d = 2 * (xlog - (x + theta) * torch.log((x + theta) / (m + theta)))
    d = d.clamp_min(0)
    return d, torch.sign(x - m) * torch.sqrt(d)


def refine_cells(module: VAE, loader, n_obs: int, *, max_steps: int = 20, progress=None) -> dict[str, np.ndarray]:
    """One pass over ``loader``: each cell's z*, and the statistics of the cell at z*.

    Returns ``z``, the encoder's ``mean`` and ``log_var`` (each ``n_obs`` rows by AnnData
    position, NaN for cells not in the loader) and, in the loader's order, ``model_miss``,
    ``encoder_miss`` and ``log_library``.
    """
    out = {k: [] for k in ("model_miss", "encoder_miss", "log_library")}
    rows = {k: np.full((n_obs, module.latent_dim), np.nan, dtype=np.float32) for k in ("z", "mean", "log_var")}
    with _frozen(module):
        for mb in loader:
            with torch.no_grad():
                mean, log_var = module.inference(mb.x, mb.batch, mb.cov)
            score = LogPxGivenZ(module, mb.x, mb.batch, mb.log_library, mb.cov)
            z, gain = _refine_point(module, score, mb.batch, mean, log_var, max_steps=max_steps)
            with torch.no_grad():
                d, _ = deviance_residuals(module, mb.x, module.generative(z, mb.batch, mb.log_library, mb.cov))
                out["model_miss"].append((d.sum(1) / mb.x.sum(1).clamp_min(1)).double().cpu().numpy())
            out["encoder_miss"].append(gain.double().cpu().numpy())
            out["log_library"].append(mb.log_library.double().cpu().numpy())
            for k, v in (("z", z), ("mean", mean), ("log_var", log_var)):
                rows[k][mb.idx] = v.cpu().numpy()
            if progress is not None:
                progress.update()
    return {**rows, **{k: np.concatenate(v) for k, v in out.items()}}


class _frozen:
    """Eval mode and no weight gradients inside the block; restored afterwards."""

    def __init__(self, module: VAE):
        self.module = module

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.module.parameters()]
        self.was_training = self.module.training
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, f in zip(self.module.parameters(), self.flags, strict=True):
            p.requires_grad_(f)
        self.module.train(self.was_training)


@torch.no_grad()
def residual_blocks(module: VAE, loader, z: np.ndarray):
    """Yield (minibatch, signed deviance residuals (cells, genes)) at the cells' z* (rows of ``z`` by position)."""
    with _frozen(module):
        for mb in loader:
            zc = torch.as_tensor(z[mb.idx], device=mb.x.device)
            _, r = deviance_residuals(module, mb.x, module.generative(zc, mb.batch, mb.log_library, mb.cov))
            yield mb, r.cpu()


def programme_scores(residuals: np.ndarray, batch: np.ndarray | None, center: np.ndarray, scale: np.ndarray, *,
                     n_top: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Programme score, driving genes and their z-scores of cells from their residuals (cells, genes).

    ``center`` is (batch codes, genes): each cell's residuals are centred by its batch's row
    (one row: the same for all), then divided by the per-gene ``scale``.
    """
    center, scale = torch.as_tensor(center), torch.as_tensor(scale)
    prog, genes, scores = [], [], []
    for lo in range(0, len(residuals), 4096):
        r = torch.as_tensor(residuals[lo:lo + 4096])
        c = center[0] if len(center) == 1 else center[torch.as_tensor(batch[lo:lo + 4096]).long()]
        top = torch.topk((r - c) / scale, min(n_top, r.shape[1]), dim=1)
        prog.append(top.values.mean(1).double().numpy())
        genes.append(top.indices.numpy())
        scores.append(top.values.numpy())
    return np.concatenate(prog), np.concatenate(genes), np.concatenate(scores)


def residual_rows(module: VAE, loader, z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Return the signed deviance residuals of the loader's cells, (cells, genes) float32, and their batch codes."""
    rows, codes = [], []
    for mb, r in residual_blocks(module, loader, z):
        rows.append(r.numpy())
        codes.append(None if mb.batch is None else mb.batch.cpu().numpy())
    return np.concatenate(rows), (None if codes[0] is None else np.concatenate(codes))


def gene_statistics(residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene median and robust scale (1.4826 x MAD, at least ``MIN_SCALE``) of reference residuals."""
    center = np.median(residuals, axis=0)
    mad = 1.4826 * np.median(np.abs(residuals - center), axis=0)
    return center.astype(np.float32), np.maximum(mad, MIN_SCALE).astype(np.float32)


def latent_distance(reference: np.ndarray, cells: np.ndarray, *, n_neighbors: int = 15,
                    skip_self: np.ndarray | None = None, chunk: int = 2048) -> np.ndarray:
    """Mean Euclidean distance from each row of ``cells`` to its ``n_neighbors`` nearest rows of ``reference``.

    ``skip_self``: cells that are themselves rows of ``reference``; their nearest row (themselves) is left out.
    """
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float32))
    k = min(n_neighbors, len(ref) - 1)
    out = np.empty(len(cells))
    skip = np.zeros(len(cells), bool) if skip_self is None else np.asarray(skip_self)
    for lo in range(0, len(cells), chunk):
        c = torch.as_tensor(np.asarray(cells[lo:lo + chunk], dtype=np.float32))
        dist = torch.cdist(c, ref)
        near = torch.topk(dist, k + 1, dim=1, largest=False).values.numpy()
        s = skip[lo:lo + chunk]
        out[lo:lo + chunk] = np.where(s, near[:, 1:].mean(1), near[:, :k].mean(1))
    return out


def tail_pvalue(reference: np.ndarray, values: np.ndarray, *, tail: float = TAIL) -> np.ndarray:
    """Upper-tail p-value of each of ``values`` among ``reference`` values, in (0, 1].

    Empirical, (1 + #reference >= v) / (n + 1), up to the reference's (1 - ``tail``) quantile u;
    beyond it, a peaks-over-threshold tail: P(V >= u) exp(-(v - u) / beta), beta the mean
    excess of the reference values over u.
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    v = np.asarray(values, dtype=np.float64)
    n = len(ref)
    p = (1 + n - np.searchsorted(ref, v, side="left")) / (n + 1)
    u = np.quantile(ref, 1 - tail)
    exc = ref[ref > u] - u
    if len(exc):
        beta = max(float(exc.mean()), 1e-9)
        p_u = (1 + n - np.searchsorted(ref, u, side="left")) / (n + 1)
        p = np.where(v > u, p_u * np.exp(-np.maximum(v - u, 0.0) / beta), p)  # exp only where it is used
    return np.clip(p, 1e-300, 1.0)


def combine(calibration: dict[str, np.ndarray], cells: dict[str, np.ndarray], log_lib_cal: np.ndarray,
            log_lib: np.ndarray, *, shift_groups: np.ndarray | None = None, n_neighbors: int = 100,
            combined: tuple[str, ...] | None = None,
            weights: dict[str, float] | None = None) -> tuple[np.ndarray, dict, dict]:
    """Coverage of ``cells`` from their component statistics, calibrated on the ``calibration`` cells.

    ``shift_groups``: per cell, a group (a batch the reference never saw) whose batch-wide offset
    and widening are removed, or -1: where a group's lower quartile of a depth-adjusted statistic
    lies above the calibration cells', the group is moved down onto theirs, and where its spread
    between the 5% and 25% quantiles is wider than theirs, it is shrunk to theirs around that
    quartile (those quantiles stay put while the cells the reference does not cover are under
    three quarters of the group). A lower quartile is never moved up.
    ``combined``: the components whose p-values enter Fisher's combination (None: all of them);
    every component gets its p-value. ``weights``: per component, the factor of its -2 log p in
    the combination (1 where not named); the weighted sum is calibrated like the plain one.
    Returns the coverage of the cells, their per-component p-values and the calibration cells'
    coverage (in-sample: close to uniform).
    """
    n_cal = len(log_lib_cal)
    lib = np.concatenate([log_lib_cal, log_lib])
    ref = np.r_[np.ones(n_cal, bool), np.zeros(len(log_lib), bool)]
    p_cal, p_cells = {}, {}
    for name in calibration:
        stat = np.concatenate([calibration[name], cells[name]])
        _, z = compare_to_reference(stat, lib, ref, n_neighbors=min(n_neighbors, n_cal))
        z_cal, z_cells = z[:n_cal], z[n_cal:]
        if shift_groups is not None:
            for g in np.unique(shift_groups[shift_groups >= 0]):
                m = shift_groups == g
                q05, q25 = np.quantile(z_cells[m], [0.05, 0.25])
                c05, c25 = np.quantile(z_cal, [0.05, 0.25])
                spread = max(1.0, (q25 - q05) / max(c25 - c05, 1e-9))
                z_cells[m] = min(q25, c25) + (z_cells[m] - q25) / spread  # its lower quartile never moves up
        p_cal[name], p_cells[name] = tail_pvalue(z_cal, z_cal), tail_pvalue(z_cal, z_cells)
    names = list(calibration) if combined is None else list(combined)
    w = {n: (weights or {}).get(n, 1.0) for n in names}
    fisher_cal = -2 * sum(w[n] * np.log(p_cal[n]) for n in names)
    fisher = -2 * sum(w[n] * np.log(p_cells[n]) for n in names)
    return tail_pvalue(fisher_cal, fisher), p_cells, tail_pvalue(fisher_cal, fisher_cal)
