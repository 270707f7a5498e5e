"""Shared plumbing for plots: the ``ax``/``show``/``return_fig`` convention and y-limits."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def finish(fig, axes, *, show: bool | None, return_fig: bool, ax_given: bool):
    """Show, or return the Figure / Axes, as scanpy plots do."""
    if return_fig:
        return fig
    if show is None:
        show = not ax_given
    if show:
        plt.show()
        return None
    return axes


def robust_ylim(ax, *series, skip_frac: float = 0.1, pad: float = 0.08) -> None:
    """Fit the y-range to the curves after their first ``skip_frac`` of points.

    The first epochs of training sit far below the rest; including them squashes the
    part of the curve a reader cares about.
    """
    vals = []
    for s in series:
        s = np.asarray(s, dtype=float)
        s = s[int(len(s) * skip_frac):] if len(s) > 5 else s
        vals.append(s[np.isfinite(s)])
    vals = np.concatenate(vals) if vals else np.array([])
    if vals.size == 0:
        return
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.05
    ax.set_ylim(lo - pad * span, hi + pad * span)


def get_uns(adata, key: str) -> dict:
    if key not in adata.uns:
        raise KeyError(f"adata.uns[{key!r}] not found; run sv.tl.vae(adata, key_added={key!r}) first.")
    return adata.uns[key]
