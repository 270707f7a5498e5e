"""``pl.gap_history``: the gaps recorded over training (``tl.vae(..., gap_every=N)``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

from .._docs import doc_params
from ..diagnostics.history import overfitting_epochs
from ._gap import SPLITS
from ._utils import finish, get_uns


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

    The amortization gap of training cells (blue) and held-out cells (orange), solid, with
    ±2 standard errors shaded; the approximation gaps dashed. A held-out amortization gap
    that pulls away from the training one means the encoder overfits its training cells:
    the epochs where it is more than twice the training gap and above it by more than 2
    standard errors (the condition of the warning ``tl.vae`` gives) are shaded red, and the
    title says from which epoch. The dotted line marks the best epoch, whose weights are kept.

    Parameters
    ----------
    {adata}
    {key}
    {plot_common}

    Returns
    -------
    The Axes when not shown; the Figure with ``return_fig``.
    """
    uns = get_uns(adata, key)
    h = uns["history"]
    if "amortization_gap_train" not in h:
        raise KeyError(f"No gaps in adata.uns[{key!r}]['history']; train with sv.tl.vae(..., gap_every=N).")
    fig, ax_ = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4.5), layout="constrained")
    epochs = np.asarray(h["epoch"])
    for split, (label, color) in SPLITS.items():
        for gap, ls in (("amortization", "-"), ("approximation", "--")):
            col = f"{gap}_gap_{split}"
            if col not in h:
                continue
            v = np.asarray(h[col], dtype=float)
            m = np.isfinite(v)
            ax_.plot(epochs[m], v[m], ls=ls, marker="o", ms=3, color=color, alpha=1 if gap == "amortization" else 0.6,
                     label=f"{gap} gap, {label}")
            se = np.asarray(h.get(f"{col}_se", np.full(len(v), np.nan)), dtype=float)[m]
            if gap == "amortization" and np.isfinite(se).all():
                ax_.fill_between(epochs[m], v[m] - 2 * se, v[m] + 2 * se, color=color, alpha=0.15, lw=0)
    title = "Gaps over training"
    if "amortization_gap_validation" in h:
        bad = overfitting_epochs(h)
        rec = epochs[np.isfinite(np.asarray(h["amortization_gap_validation"], dtype=float))]
        for i, e in enumerate(rec):  # shade back to the previous measurement
            if bad[epochs == e].any():
                ax_.axvspan(rec[i - 1] if i else e - 0.5, e, color="red", alpha=0.1, lw=0)
        title = (f"Held-out gap well above the training gap from epoch {int(epochs[bad][0])}: the encoder overfits"
                 if bad.any() else "Held-out and training cells: no sign of an overfitting encoder")
    if uns.get("best_epoch", -1) > 0:
        ax_.axvline(uns["best_epoch"], color="0.4", ls=":", lw=1, label=f"best epoch ({uns['best_epoch']}), kept")
    ax_.axhline(0, color="k", lw=0.8)
    ax_.set_xlabel("epoch")
    ax_.set_ylabel("nats per cell (mean over a fixed subset)")
    ax_.set_title(title, fontsize="medium", loc="left")
    ax_.grid(alpha=0.3)
    ax_.legend(fontsize="small", frameon=False, loc="upper right",
               title="shaded red: held-out gap > 2x training and by > 2 s.e." if "overfits" in title else None,
               title_fontsize="small")
    return finish(fig, ax_, show=show, return_fig=return_fig, ax_given=ax is not None)
