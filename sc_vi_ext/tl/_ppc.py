"""``tl.posterior_predictive``: whether counts simulated from the fitted model look like the data."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._progress import tqdm
from ..model_store import gene_alignment, stored_loader
from ..module import VAE
from ..module.distributions import count_distribution
from ..threads import cpu_threads
from ._shared import STATS, sample_latent
from ._utils import stored_model


def sample_counts(module: VAE, params: dict) -> torch.Tensor:
    """One draw of counts from the model's likelihood with parameters ``params`` (global torch RNG).

    NB as a Gamma-Poisson mixture (rate ~ Gamma(theta, theta / mu)); ZINB additionally
    sets each count to zero with the dropout probability sigmoid(zi_logits) (see
    :mod:`sc_vi_ext.module.distributions`).
    """
    return count_distribution(module.likelihood, params).sample()


class _Moments:
    """Per-gene sums over cells of x, x^2 and 1[x = 0], for ``n`` replicates, in float64."""

    def __init__(self, n: int, n_genes: int):
        self.s = np.zeros((3, n, n_genes))
        self.n_cells = 0

    def add(self, i: int, x: torch.Tensor) -> None:
        x = x.double()
        self.s[:, i] += torch.stack([x.sum(0), (x * x).sum(0), (x == 0).double().sum(0)]).cpu().numpy()

    def stats(self) -> dict[str, np.ndarray]:
        """Each statistic as (n, genes): mean, sample variance, CV (sd / mean), zero fraction."""
        n = self.n_cells
        mean = self.s[0] / n
        var = np.maximum(self.s[1] - n * mean**2, 0) / max(n - 1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = np.where(mean > 0, np.sqrt(var) / mean, np.nan)
        return {"mean": mean, "var": var, "cv": cv, "frac_zero": self.s[2] / n}


def summarize_ppc(obs: dict, pred: dict, pred_sd: dict) -> dict:
    """Per statistic: mean ``|log(pred / obs)|`` over genes with both positive, and genes off by > 3 sd."""
    out = {}
    for s in STATS:
        o, p, sd = obs[s], pred[s], pred_sd[s]
        ok = np.isfinite(o) & np.isfinite(p) & (o > 0) & (p > 0)
        off = np.abs(o - p) > 3 * sd
        out[s] = {
            "mean_abs_log_ratio": float(np.mean(np.abs(np.log(p[ok] / o[ok])))) if ok.any() else float("nan"),
            "frac_outside_3sd": float(np.mean(off[np.isfinite(o) & np.isfinite(p)])),
            "n_genes": int(ok.sum()),
        }
    return out


def _warn_unestimable(summary: dict, n_samples: int) -> None:
    """Warn where the summary holds a number that cannot be estimated (called by the tool, under its wrapper)."""
    empty = [s for s, v in summary.items() if v["n_genes"] == 0]
    if empty:
        n_genes = max(v["n_genes"] for v in summary.values())
        warnings.warn(f"posterior_predictive: mean_abs_log_ratio of {empty} is NaN: none of the model's genes has "
                      f"both an observed and a predicted value above 0 (the other statistics use {n_genes} gene(s)).",
                      UserWarning, stacklevel=4)  # the line of the user's call
    if n_samples == 1:
        warnings.warn("posterior_predictive: with n_samples=1 the replicates' spread cannot be estimated (pred_sd "
                      "is 0), so frac_outside_3sd counts every difference; use n_samples >= 2.",
                      UserWarning, stacklevel=4)


@doc_params()
@cpu_threads
def posterior_predictive(
    adata: AnnData,
    *,
    key: str = "vae",
    n_samples: int = 10,
    batch_size: int = 256,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Posterior predictive check of the count likelihood, gene by gene.

    ``n_samples`` replicate data sets are drawn: for every cell, z ~ q(z | x), then counts
    from the model's likelihood with the cell's own batch and library (Poisson; NB as a
    Gamma-Poisson mixture; ZINB with the dropout mass). Per gene, the mean, variance,
    coefficient of variation and fraction of zeros over cells of the observed counts are
    compared with those of the replicates (mean and standard deviation over replicates).
    A likelihood that fits badly shows as observed values outside the replicates' spread,
    e.g. an excess of zeros or of variance.

    Cells are streamed in minibatches; only per-gene sums are kept, never the samples.

    Parameters
    ----------
    {adata}
    {key}
    n_samples
        Replicate data sets drawn.
    {apply_model}

    Returns
    -------
    None, or a copy with ``copy=True``; writes, for each statistic ``stat`` in ``mean``,
    ``var`` (sample variance), ``cv`` (sd / mean, NaN where the mean is 0) and
    ``frac_zero``, columns of ``adata.var`` (kept with the genes when subsetting; NaN for
    genes the model lacks)

    ``key + "_ppc_" + stat + "_obs"``
        The statistic of the observed counts.
    ``key + "_ppc_" + stat + "_pred"``
        Its mean over the replicates.
    ``key + "_ppc_" + stat + "_pred_sd"``
        Its standard deviation over the replicates (the spread expected by chance).

    ``adata.uns[key]["posterior_predictive"]``
        ``params``, and ``summary``: per statistic, ``mean_abs_log_ratio`` (mean over
        genes of ``|log(pred / obs)|``, genes with both positive), ``frac_outside_3sd``
        (fraction of genes with ``|obs - pred|`` > 3 sd) and ``n_genes`` (genes in the log
        ratio).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, not {n_samples}.")
    module, dev = stored_model(adata, key, device)
    model_genes, gene_index = gene_alignment(adata, key)
    # var row of each model gene (statistics are in the model's gene order); genes the model lacks get NaN
    rows = None if gene_index is None else adata.var_names.get_indexer(model_genes)
    adata = adata.copy() if copy else adata
    start = logg.info(f"posterior predictive check of {key!r}: {n_samples} replicate(s) of {adata.n_obs} cells")
    observed, replicates = _Moments(1, module.n_genes), _Moments(n_samples, module.n_genes)
    gen = torch.Generator(device=dev).manual_seed(random_state)
    loader = stored_loader(adata, key, batch_size=batch_size, device=dev)
    with torch.no_grad(), torch.random.fork_rng(devices=[] if dev == "cpu" else None):
        torch.manual_seed(random_state)  # the samplers draw from the global RNG, restored afterwards
        for mb in tqdm(loader, desc="posterior predictive", unit="batch", disable=not progress, leave=False):
            observed.add(0, mb.x)
            observed.n_cells += len(mb.idx)
            replicates.n_cells += len(mb.idx)
            mean, log_var = module.inference(mb.x, mb.batch, mb.cov)
            for i in range(n_samples):
                z = sample_latent(mean, log_var, 1, gen)[0]
                replicates.add(i, sample_counts(module, module.generative(z, mb.batch, mb.log_library, mb.cov)))
    obs = {s: v[0] for s, v in observed.stats().items()}
    rep = replicates.stats()
    with warnings.catch_warnings():  # a CV that is NaN in every replicate stays NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        pred = {s: np.nanmean(v, 0) for s, v in rep.items()}
        pred_sd = {s: np.nanstd(v, 0, ddof=1) if n_samples > 1 else np.zeros_like(v[0]) for s, v in rep.items()}
    cols = []
    for s in STATS:
        for suffix, values in (("obs", obs[s]), ("pred", pred[s]), ("pred_sd", pred_sd[s])):
            if rows is not None:
                col = np.full(adata.n_vars, np.nan)
                col[rows[rows >= 0]] = values[rows >= 0]
                values = col
            adata.var[f"{key}_ppc_{s}_{suffix}"] = values
            cols.append(f"{key}_ppc_{s}_{suffix}")
    summary = summarize_ppc(obs, pred, pred_sd)
    _warn_unestimable(summary, n_samples)
    adata.uns[key]["posterior_predictive"] = {
        "params": {"n_samples": int(n_samples), "random_state": random_state}, "summary": summary,
    }
    ratios = ", ".join(f"{s} {v['mean_abs_log_ratio']:.3f}" for s, v in summary.items())
    logg.info(f"    mean |log(pred / obs)|: {ratios}")
    logg.info("    finished", time=start, deep=f"added\n    {len(cols)} columns {key}_ppc_* (adata.var)\n"
              f"    'posterior_predictive' (adata.uns[{key!r}])")
    return adata if copy else None
