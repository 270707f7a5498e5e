"""``pl.reference_coverage``: where the reference does not explain the query, and which groups it misses.

Everything drawn is read from what ``tl.reference_coverage`` wrote; the data are not touched.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData

from .._docs import doc_params
from ..inputs import group_labels
from ._utils import finish, get_uns


def _coverage_results(adata: AnnData, key: str) -> dict:
    uns = get_uns(adata, key)
    if "coverage" not in uns or f"{key}_coverage" not in adata.obs:
        raise KeyError(f"No coverage in adata.uns[{key!r}]; run sv.tl.reference_coverage(adata, reference=..., "
                       f"key={key!r}) first.")
    return uns["coverage"]


def _shares(ax, adata: AnnData, key: str, groupby: str | None, alpha: float, shifted: set[str]) -> None:
    """Per group, the share of its cells uncovered, against the reference's expected share ``alpha``.

    ``shifted``: the groups the group test flagged (named on their bar, red like a missed group).
    """
    flag = adata.obs[f"{key}_uncovered"].to_numpy().astype(bool)
    groups = group_labels(adata, groupby)[0] if groupby else np.full(adata.n_obs, "all cells")
    share = pd.Series(flag, index=adata.obs_names).groupby(groups).agg(["mean", "size"])
    share = share.sort_values("mean")
    y = np.arange(len(share))
    missed = [str(g) for g, m in share["mean"].items() if m > 5 * alpha]
    moved = [str(g) for g in share.index[::-1] if str(g) in shifted and str(g) not in missed]
    ax.barh(y, 100 * share["mean"], color=np.where(share.index.isin(missed + moved), "#c44e52", "#8c8c8c"))
    for yi, (g, m, n) in zip(y, share.itertuples(), strict=True):
        note = "; group shifted" if str(g) in shifted else ""
        ax.text(100 * m, yi, f"  {100 * m:.0f}% of {n}{note}", va="center", fontsize="small")
    ax.axvline(100 * alpha, color="k", ls="--", lw=0.8, label=f"expected for covered cells ({100 * alpha:g}%)")
    ax.set_yticks(y, share.index, fontsize="small")
    ax.set_xlim(0, 118 + 22 * bool(shifted))  # room for the longer labels
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("cells uncovered (%)")
    ax.legend(loc="lower right", fontsize="small", frameon=False)
    if missed:
        title = f"The reference does not cover: {', '.join(missed[::-1][:3])}"
        title += f"; shifted: {', '.join(moved[:3])}" if moved else ""
    else:
        title = f"Shifted from the reference: {', '.join(moved[:3])}" if moved else "The reference covers every group"
    ax.set_title(title, fontsize="medium", loc="left")


@doc_params()
def reference_coverage(
    adata: AnnData,
    *,
    key: str = "vae",
    groupby: str | None = None,
    basis: str = "umap",
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs,
):
    """Plot the coverage of :func:`sc_vi_ext.tl.reference_coverage`: on the embedding, and per group.

    Left, the embedding ``obsm["X_" + basis]`` coloured by ``obs[key + "_coverage"]`` (dark: the
    reference does not explain the cell); right, per group the share of cells flagged uncovered,
    red where it exceeds five times the share expected of covered cells (the threshold alpha) or
    where the tool's group test flagged the group (with ``groupby`` the tool's, its bar says so).
    With ``ax`` given, only the per-group panel is drawn into it.

    Parameters
    ----------
    {adata}
    {key}
    groupby
        Column of ``adata.obs`` to group by; None: the tool's ``groupby`` (the batch by default).
    basis
        Embedding in ``obsm["X_" + basis]`` (compute it first, e.g. ``sc.tl.umap``).
    {plot_common}
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.

    Returns
    -------
    The Axes (a list of two without ``ax``) when not shown; the Figure with ``return_fig``.
    """
    res = _coverage_results(adata, key)
    groupby = groupby or res.get("groupby") or None
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs.")
    alpha = float(res["threshold"])
    shifted = set(res.get("groups_shifted", [])) if groupby == (res.get("groupby") or None) else set()
    if ax is not None:
        _shares(ax, adata, key, groupby, alpha, shifted)
        return finish(ax.figure, ax, show=show, return_fig=return_fig, ax_given=True)
    if f"X_{basis}" not in adata.obsm:
        raise KeyError(f"adata.obsm['X_{basis}'] not found; compute the embedding first, e.g. "
                       f"sc.pp.neighbors(adata, use_rep='X_{key}'); sc.tl.umap(adata).")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    opts = {"cmap": "magma", "vmin": 0, "vmax": 1, "title": "reference coverage (low: not explained)", **kwargs}
    sc.pl.embedding(adata, basis=basis, color=f"{key}_coverage", ax=axes[0], show=False, **opts)
    _shares(axes[1], adata, key, groupby, alpha, shifted)
    fig.tight_layout()
    return finish(fig, list(axes), show=show, return_fig=return_fig, ax_given=False)
