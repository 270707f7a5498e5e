"""``pl.amortization_gap`` and ``pl.gap_history``: the inference diagnostics at a glance."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData

from .._docs import doc_params
from ..dataloader import get_counts, row_totals
from ._utils import finish, get_uns

_SPLIT_LABEL = {"train": "training cells", "validation": "held-out cells"}
_COLORS = {"amortization": "#d95f02", "approximation": "#7570b3"}


def _gap_results(adata: AnnData, key: str) -> dict:
    uns = get_uns(adata, key)
    if "amortization_gap" not in uns:
        raise KeyError(f"No gap diagnostics in adata.uns[{key!r}]; run sv.tl.amortization_gap(adata, key={key!r}) first.")
    return uns["amortization_gap"]


def _ladder(ax, res: dict) -> None:
    """Stacked bars: inference gap = amortization gap + approximation gap, per split."""
    splits = [s for s in ("train", "validation") if s in res] or ["all"]
    y = np.arange(len(splits))
    for i, s in enumerate(splits):
        r = res[s]
        a, b = r["amortization_gap_mean"], r["approximation_gap_mean"]
        ax.barh(i, a, height=0.5, color=_COLORS["amortization"], xerr=r["amortization_gap_se"], capsize=3,
                label="amortization gap  L[q*] − L[q]" if i == 0 else None)
        ax.barh(i, b, height=0.5, left=a, color=_COLORS["approximation"], xerr=r["approximation_gap_se"], capsize=3,
                label="approximation gap  log p(x) − L[q*]" if i == 0 else None)
        ax.text(a + b, i, f"  {a + b:.2f}", va="center", fontsize="small")
        ax.text(0.01, i + 0.36,
                f"L[q] {r['elbo_mean']:.1f}  ≤  L[q*] {r['elbo_opt_mean']:.1f}  ≤  log p(x) {r['log_px_mean']:.1f}"
                f"   (n={r['n_cells']})", fontsize="x-small", va="center", color="0.3")
    ax.set_yticks(y, [_SPLIT_LABEL.get(s, s) for s in splits])
    ax.set_ylim(-0.5, len(splits) - 0.35)
    ax.set_xlabel("nats per cell (mean ± s.e.)")
    ax.set_title("Inference gap = log p(x) − L[q]")
    ax.legend(loc="lower right", fontsize="x-small")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.15)


@doc_params()
def amortization_gap(
    adata: AnnData,
    *,
    key: str = "vae",
    groupby: str | None = None,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """Plot the amortization-gap diagnostics of :func:`sc_vi_ext.tl.amortization_gap`.

    Panels: (1) the bound ladder L[q] ≤ L[q*] ≤ log p(x) for training and held-out
    cells, as the inference gap split into amortization and approximation gap, with
    standard errors; (2) the per-cell amortization gap histogram, its 95th percentile and
    cells below zero by more than 3 standard errors marked; (3) the gap against total
    counts, coloured by batch when the model has one; (4) with ``groupby``, the gap per group.

    Parameters
    ----------
    {adata}
    {key}
    groupby
        Column of ``adata.obs`` (e.g. cell types or clusters) for panel (4).
    {plot_common}
        With ``ax``, only the ladder panel (1) is drawn, into ``ax``.

    Returns
    -------
    The list of Axes (or the one given ``ax``) when not shown; the Figure with ``return_fig``.
    """
    res = _gap_results(adata, key)
    if ax is not None:
        _ladder(ax, res)
        return finish(ax.figure, ax, show=show, return_fig=return_fig, ax_given=True)
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs.")
    n_panels = 4 if groupby else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(4.8 * n_panels + 1, 3.8), layout="constrained",
                             width_ratios=[1.4] + [1] * (n_panels - 1))
    _ladder(axes[0], res)

    gap = adata.obs[f"{key}_amortization_gap"].to_numpy()
    done = np.isfinite(gap)
    g = gap[done]
    se = adata.obs[f"{key}_amortization_gap_se"].to_numpy()[done]
    ax2 = axes[1]
    ax2.hist(g, bins=40, color=_COLORS["amortization"], alpha=0.85)
    q95 = np.quantile(g, 0.95)
    ax2.axvspan(q95, g.max(), color="0.5", alpha=0.15, label=f"top 5% (> {q95:.2f})")
    ax2.axvline(0, color="k", lw=0.8)
    neg = int((g < -3 * se).sum())
    ax2.set_title(f"Per-cell amortization gap ({neg} cell(s) < 0 by > 3 s.e.)", fontsize="medium")
    ax2.set_xlabel("L[q*] − L[q] (nats)")
    ax2.set_ylabel("cells")
    ax2.legend(fontsize="x-small")

    params = adata.uns[key]["params"]
    totals = row_totals(get_counts(adata, params["layer"]))[done]
    ax3 = axes[2]
    bkey = params.get("batch_key")
    if bkey:
        labels = adata.obs[bkey].astype(str).to_numpy()[done]
        for i, b in enumerate(np.unique(labels)):
            m = labels == b
            ax3.scatter(totals[m], g[m], s=6, alpha=0.6, color=f"C{i}", label=b)
        ax3.legend(fontsize="x-small", markerscale=2, title=bkey, title_fontsize="x-small")
    else:
        ax3.scatter(totals, g, s=6, alpha=0.6, color=_COLORS["amortization"])
    ax3.set_xscale("log")
    ax3.axhline(0, color="k", lw=0.8)
    ax3.set_xlabel("total counts")
    ax3.set_ylabel("amortization gap (nats)")
    ax3.set_title("Gap against library size")

    if groupby:
        ax4 = axes[3]
        groups = adata.obs[groupby].to_numpy()[done]
        cats = [c for c in pd.unique(groups)]
        order = sorted(cats, key=lambda c: -np.median(g[groups == c]))
        ax4.boxplot([g[groups == c] for c in order], vert=False, showfliers=True,
                    flierprops={"markersize": 2})
        ax4.set_yticks(np.arange(1, len(order) + 1), [str(c) for c in order], fontsize="x-small")
        ax4.invert_yaxis()
        ax4.axvline(0, color="k", lw=0.8)
        ax4.set_xlabel("amortization gap (nats)")
        ax4.set_title(f"Gap per {groupby}")
    return finish(fig, list(axes), show=show, return_fig=return_fig, ax_given=False)


@doc_params()
def gap_history(
    adata: AnnData,
    *,
    key: str = "vae",
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """Plot the gaps recorded during training (``tl.vae(..., gap_every=N)``) against epochs.

    A held-out amortization gap that grows while the training one stays flat or shrinks
    means the encoder overfits the training cells.

    Parameters
    ----------
    {adata}
    {key}
    {plot_common}

    Returns
    -------
    The Axes when not shown; the Figure with ``return_fig``.
    """
    h = get_uns(adata, key)["history"]
    if "amortization_gap_train" not in h:
        raise KeyError(f"No gaps in adata.uns[{key!r}]['history']; train with sv.tl.vae(..., gap_every=N).")
    fig, ax_ = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    epochs = np.asarray(h["epoch"])
    for gap, color in (("amortization", _COLORS["amortization"]), ("approximation", _COLORS["approximation"])):
        for split, ls in (("train", "-"), ("validation", "--")):
            col = f"{gap}_gap_{split}"
            if col not in h:
                continue
            v = np.asarray(h[col], dtype=float)
            m = np.isfinite(v)
            ax_.plot(epochs[m], v[m], ls=ls, marker="o", ms=3, color=color, label=f"{gap} gap, {_SPLIT_LABEL[split]}")
    ax_.set_xlabel("epoch")
    ax_.set_ylabel("nats per cell")
    ax_.set_title("Gaps over training")
    ax_.grid(alpha=0.3)
    ax_.legend(fontsize="x-small")
    return finish(fig, ax_, show=show, return_fig=return_fig, ax_given=ax is not None)
