"""``pl.elbo``: training curves."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

from .._docs import doc_params
from ._utils import finish, get_uns, robust_ylim


@doc_params()
def elbo(
    adata: AnnData,
    *,
    key: str = "vae",
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
):
    """Plot the ELBO, reconstruction and KL per epoch for training and held-out cells.

    All values are per cell in nats and unweighted (the KL warm-up weight is drawn as a
    dashed line on the KL panel). The y-range ignores the first tenth of the epochs so that
    the start of training does not flatten the rest. The best epoch is marked.

    Parameters
    ----------
    {adata}
    {key}
    {plot_common}
        With ``ax``, only the ELBO panel is drawn, into ``ax``.

    Returns
    -------
    The list of three Axes (ELBO, reconstruction, KL), or the one Axes when ``ax`` was
    given, when not shown; the Figure with ``return_fig``.
    """
    uns = get_uns(adata, key)
    h = uns["history"]
    epochs = np.asarray(h["epoch"])
    if ax is None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
        axes = list(axes)  # a list, as documented (and as scanpy returns), not a numpy array
    else:
        fig, axes = ax.figure, [ax]
    panels = [("elbo", "ELBO (nats/cell)"), ("reconstruction", "E_q log p(x|z)"), ("kl", "KL(q || p)")]
    for a, (name, label) in zip(axes, panels, strict=False):
        tr, va = np.asarray(h[f"{name}_train"]), np.asarray(h[f"{name}_validation"])
        a.plot(epochs, tr, label="train", color="C0")
        if np.isfinite(va).any():
            a.plot(epochs, va, label="validation", color="C1")
        a.axvline(uns["best_epoch"], color="0.6", lw=0.8, ls=":", label="best epoch")
        robust_ylim(a, tr, va)
        a.set_xlabel("epoch")
        a.set_title(label)
        a.grid(alpha=0.3)
        if name == "kl":
            tw = a.twinx()
            tw.plot(epochs, h["kl_weight"], color="0.4", ls="--", lw=1)
            tw.set_ylim(0, 1.05)
            tw.set_ylabel("KL weight (dashed)")
    axes[0].legend(loc="lower right", fontsize="small")
    return finish(fig, axes if ax is None else ax, show=show, return_fig=return_fig, ax_given=ax is not None)
