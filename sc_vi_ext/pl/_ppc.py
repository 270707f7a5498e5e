"""``pl.posterior_predictive``: observed against simulated per-gene statistics."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .._docs import doc_params
from ..tl._shared import STATS
from ._utils import finish, get_uns

_LABELS = {"mean": "mean count", "var": "variance", "cv": "coefficient of variation", "frac_zero": "fraction of zeros"}
_LOG = {"mean", "var", "cv"}
_OK, _OFF = "#1b9e77", "#d95f02"


def _panel(ax, obs: np.ndarray, pred: np.ndarray, sd: np.ndarray, stat: str, summary: dict | None) -> None:
    ok = np.isfinite(obs) & np.isfinite(pred)
    if stat in _LOG:
        ok &= (obs > 0) & (pred > 0)
    o, p, s = obs[ok], pred[ok], sd[ok]
    off = np.abs(o - p) > 3 * s
    lo_err = np.minimum(s, p * 0.999) if stat in _LOG else s  # keep error bars positive on log axes
    ax.errorbar(o, p, yerr=[lo_err, s], fmt="none", ecolor="0.75", elinewidth=0.6, zorder=1)
    ax.scatter(o[~off], p[~off], s=9, color=_OK, alpha=0.8, lw=0, zorder=2, label="within 3 sd")
    ax.scatter(o[off], p[off], s=11, color=_OFF, alpha=0.9, lw=0, zorder=3, label="off by > 3 sd")
    if stat in _LOG:
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # minor labels crowd a short log range
            axis.set_minor_formatter(NullFormatter())
    if len(o):
        lo, hi = min(o.min(), p.min()), max(o.max(), p.max())
        lo, hi = (lo / 1.3, hi * 1.3) if stat in _LOG else (max(lo - 0.05, -0.02), min(hi + 0.05, 1.02))
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", zorder=0, label="identity")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        if stat in _LOG and hi / lo < 100:  # under two decades: label 1, 2, 3, 5 x 10^k
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(f"observed {_LABELS[stat]}")
    ax.set_ylabel(f"predicted {_LABELS[stat]}")
    title = _LABELS[stat]
    if summary is not None:
        title += f"\nmean |log ratio| {summary['mean_abs_log_ratio']:.3f}, {off.mean() if len(o) else 0:.0%} off"
    ax.set_title(title, fontsize="medium")


@doc_params()
def posterior_predictive(
    adata: AnnData,
    *,
    key: str = "vae",
    stats: str | Sequence[str] = STATS,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """Plot the posterior predictive check of :func:`sc_vi_ext.tl.posterior_predictive`.

    One panel per statistic: each gene's observed value (x) against its mean over the
    replicate data sets (y), with the replicates' standard deviation as error bars and
    the identity line; log-log for the mean, variance and CV. Genes whose observed value
    is more than 3 standard deviations from the prediction are highlighted: where they
    pile up (e.g. predicted variance or zero fraction too low) the likelihood fits badly.
    To draw into existing axes, pass one Axes per statistic as ``ax`` (an Axes for one).

    Parameters
    ----------
    {adata}
    {key}
    stats
        Statistics to plot, among ``"mean"``, ``"var"``, ``"cv"`` and ``"frac_zero"``.
    {plot_common}

    Returns
    -------
    The list of Axes (the given Axes for a single statistic) when not shown; the Figure
    with ``return_fig``.
    """
    stats = [stats] if isinstance(stats, str) else list(stats)
    unknown = [s for s in stats if s not in STATS]
    if unknown or not stats:
        raise ValueError(f"stats must be among {STATS}, not {unknown or stats}.")
    uns = get_uns(adata, key)
    if "posterior_predictive" not in uns or f"{key}_ppc_mean_obs" not in adata.var:
        raise KeyError(f"No posterior predictive check for {key!r}; "
                       f"run sv.tl.posterior_predictive(adata, key={key!r}).")
    summary = uns["posterior_predictive"].get("summary", {})
    if ax is None:
        fig, axes = plt.subplots(1, len(stats), figsize=(3.6 * len(stats) + 0.4, 3.9), layout="constrained",
                                 squeeze=False)
        axes = list(axes[0])
    else:
        axes = [ax] if isinstance(ax, plt.Axes) else list(ax)
        if len(axes) != len(stats):
            raise ValueError(f"Got {len(axes)} Axes for {len(stats)} statistic(s); pass one Axes per statistic.")
        fig = axes[0].figure
    for a, s in zip(axes, stats, strict=True):
        col = f"{key}_ppc_{s}"
        _panel(a, adata.var[f"{col}_obs"].to_numpy(float), adata.var[f"{col}_pred"].to_numpy(float),
               adata.var[f"{col}_pred_sd"].to_numpy(float), s, summary.get(s))
    axes[0].legend(fontsize="x-small", loc="upper left", markerscale=1.5)
    if ax is None:
        fig.suptitle(f"Posterior predictive check of {key!r} ({uns['params'].get('likelihood', '?')} likelihood, "
                     f"{uns['posterior_predictive']['params']['n_samples']} replicates)", fontsize="medium")
    out = axes[0] if ax is not None and isinstance(ax, plt.Axes) else axes
    return finish(fig, out, show=show, return_fig=return_fig, ax_given=ax is not None)
