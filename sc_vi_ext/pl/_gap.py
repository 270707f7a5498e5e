"""``pl.amortization_gap``: the inference diagnostics of ``tl.amortization_gap`` at a glance.

Everything drawn is read from what the tool wrote (``obs`` columns and ``uns[key]``); the
data are not touched. Training and held-out cells are drawn apart in every panel, in the
same two colours, and every panel states its one message in its title.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData

from .._docs import doc_params
from ..model_store import held_out_mask
from ._utils import finish, get_uns

SPLITS = {"train": ("training cells", "#4c72b0"), "validation": ("held-out cells", "#dd8452")}
SMALL_GROUP = 10  # fewer cells than this in a group: its summary is drawn hollow and marked
_SE_NOTE = "error bars: ±2 s.e. of the mean over cells"


def _gap_results(adata: AnnData, key: str) -> dict:
    uns = get_uns(adata, key)
    if "amortization_gap" not in uns:
        raise KeyError(
            f"No gap diagnostics in adata.uns[{key!r}]; run sv.tl.amortization_gap(adata, key={key!r}) first."
        )
    return uns["amortization_gap"]


def _split_of_cells(adata: AnnData, key: str) -> np.ndarray:
    """'train' or 'validation' per cell, from the held-out cells ``tl.vae`` stored."""
    split = np.full(adata.n_obs, "train", dtype=object)
    split[held_out_mask(adata, key)] = "validation"
    return split


def _means(ax, res: dict) -> None:
    """Panel A: mean amortization and approximation gap, training vs held-out cells."""
    splits = [s for s in SPLITS if s in res]
    rows = [("amortization_gap", "amortization gap\nL[q*] − L[q]\n(the shared encoder)"),
            ("approximation_gap", "approximation gap\nlog p(x) − L[q*]\n(the Gaussian family)")]
    h = 0.8 / max(len(splits), 1)
    top = 0.0
    for i, (col, _) in enumerate(rows):
        for j, s in enumerate(splits):
            r = res[s]
            y = i + (j - (len(splits) - 1) / 2) * h
            m, se = r[f"{col}_mean"], r[f"{col}_se"]
            label, color = SPLITS[s]
            ax.barh(y, m, height=h * 0.9, color=color, xerr=2 * se, capsize=3,
                    label=f"{label} (n={r['n_cells']})" if i == 0 else None)
            ax.text(m + 2 * se, y, f"  {m:.2f} ± {se:.2f}", va="center", fontsize="small")
            top = max(top, m + 2 * se)
    ax.set_yticks(range(len(rows)), [lab for _, lab in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(min(0, ax.get_xlim()[0]), top * 1.45)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"nats per cell (mean; {_SE_NOTE})")
    ax.legend(loc="lower right", fontsize="small", frameon=False)
    if {"train", "validation"} <= set(res):
        t, v = res["train"], res["validation"]
        diff = v["amortization_gap_mean"] - t["amortization_gap_mean"]
        sig = diff > 2 * np.hypot(v["amortization_gap_se"], t["amortization_gap_se"])
        ratio = v["amortization_gap_mean"] / max(t["amortization_gap_mean"], 1e-9)
        title = (f"The encoder serves held-out cells worse: {ratio:.1f}× the training cells' gap" if sig
                 else "The encoder serves held-out and training cells alike")
    else:
        title = "What the encoder and the Gaussian family cost per cell"
    ax.set_title(title, fontsize="medium", loc="left")


def _spread(ax, gap, se, split) -> None:
    """Panel B: histogram of per-cell gaps per split, as fractions of each split's cells."""
    hi = np.quantile(gap, 0.995)
    lo = min(0.0, np.quantile(gap, 0.001))
    bins = np.linspace(lo, hi, 41)
    for s, (label, color) in SPLITS.items():
        g = gap[split == s]
        if len(g) == 0:
            continue
        ax.hist(np.clip(g, lo, hi), bins=bins, weights=np.full(len(g), 1 / len(g)), histtype="step", lw=1.6,
                color=color, label=f"{label} (n={len(g)}), median {np.median(g):.2f}")
        ax.axvline(np.median(g), color=color, ls="--", lw=1)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("amortization gap per cell (nats)")
    ax.set_ylabel("fraction of the split's cells")
    neg = int((gap < -3 * se).sum())
    n_out = int((gap > hi).sum())
    notes = ["dashed: medians"]
    if n_out:
        notes.append(f"{n_out} cells above {hi:.1f} counted in the last bin")
    notes.append("no cell's gap is below zero beyond its noise" if neg == 0 else
                 f"{neg} cell(s) below zero by > 3 s.e.: optimisation failed")
    # a white frame: the median lines and points may run behind the legend
    ax.legend(fontsize="small", framealpha=0.9, edgecolor="none", title="\n".join(notes), title_fontsize="small",
              alignment="right")
    train = gap[split == "train"] if (split == "train").any() else gap
    ax.set_title(f"90% of training cells lose under {np.quantile(train, 0.9):.1f} nats",
                 fontsize="medium", loc="left")


def _by_depth(ax, gap, lib, split) -> None:
    """Panel C: gap against library size, per split, with binned medians."""
    for s, (label, color) in SPLITS.items():
        m = split == s
        if not m.any():
            continue
        ax.scatter(lib[m], gap[m], s=7, alpha=0.45 if s == "train" else 0.8, color=color, lw=0,
                   label=f"{label} (n={m.sum()})", zorder=2 if s == "train" else 3)
        if m.sum() >= 20:
            edges = np.quantile(np.log(lib[m]), np.linspace(0, 1, 7))
            which = np.clip(np.searchsorted(edges, np.log(lib[m]), side="right") - 1, 0, 5)
            med = [(np.exp(np.log(lib[m])[which == b].mean()), np.median(gap[m][which == b])) for b in range(6)
                   if (which == b).any()]
            ax.plot(*zip(*med, strict=True), color=color, lw=2, zorder=4)
    ax.set_xscale("log")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("library size (counts per cell, log scale)")
    ax.set_ylabel("amortization gap (nats)")
    ax.legend(fontsize="small", framealpha=0.9, edgecolor="none", title="lines: medians in 6 depth bins",
              title_fontsize="small")
    rho = pd.Series(gap).corr(pd.Series(lib), method="spearman")
    title = ("Deeper cells have larger gaps (nats scale with counts)" if rho > 0.3 else
             "The gap hardly depends on library size")
    ax.set_title(f"{title}; Spearman ρ = {rho:.2f}", fontsize="medium", loc="left")


def _by_group(ax, gap, split, groups, groupby: str) -> None:
    """Panel D: median and interquartile range per group and split, with n; small groups marked."""
    cats = list(pd.unique(groups))
    ref = split == "train" if (split == "train").any() else np.ones_like(split, bool)

    def key(c):  # the training cells' median orders the groups: it is what the encoder was fitted on
        g = gap[(groups == c) & ref]
        return -np.median(g) if len(g) else np.inf

    order = sorted(cats, key=key)
    labels, worse, both = [], 0, 0
    for i, c in enumerate(order):
        ns, meds = [], []
        for j, (s, (_, color)) in enumerate(SPLITS.items()):
            g = gap[(groups == c) & (split == s)]
            ns.append(len(g))
            if len(g) == 0:
                continue
            y = i + (j - 0.5) * 0.35
            q1, med, q3 = np.quantile(g, [0.25, 0.5, 0.75])
            meds.append(med)
            small = len(g) < SMALL_GROUP
            ax.plot([q1, q3], [y, y], color=color, lw=2, alpha=0.5 if small else 1)
            ax.plot(med, y, "o", ms=6, color=color, mfc="white" if small else color)
        if len(meds) == 2:
            both += 1
            worse += meds[1] > meds[0]
        tag = " (small group)" if sum(ns) < SMALL_GROUP else ""
        labels.append(f"{c}  n={ns[0]} | {ns[1]}{tag}")
    ax.set_yticks(range(len(order)), labels, fontsize="small")
    ax.set_ylim(len(order) - 0.4, -0.6)
    ax.set_ylabel(f"{groupby} (sorted by the training cells' median)", fontsize="small")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"amortization gap (nats); dot: median, line: quartiles\n"
                  f"n = training | held-out; hollow: < {SMALL_GROUP} cells")
    if both and worse >= 0.8 * both:
        title = f"Held-out cells have the larger gap in {worse} of {both} groups"
    else:
        title = f"Largest training-cell gap: {order[0]}"
    ax.set_title(title, fontsize="medium", loc="left")


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

    A grid of panels, each with its message in the title and training cells (blue) and
    held-out cells (orange) drawn apart: (A) the mean amortization and approximation gaps
    with ±2 standard errors and the number of cells, which says whether the encoder
    generalises; (B) how the gap is spread over cells, and whether any cell's gap is below
    zero beyond noise (a failed optimisation); (C) the gap against library size, with
    medians per depth bin; (D) with ``groupby``, per group the median and quartiles with
    the number of cells, groups of fewer than 10 cells hollow and marked "(small)". All
    values are in nats and read from ``adata.obs`` and ``adata.uns[key]``. See the
    documentation page "Reading the amortization-gap figure".

    Parameters
    ----------
    {adata}
    {key}
    groupby
        Column of ``adata.obs`` (e.g. cell types or clusters) for panel (D).
    {plot_common}
        With ``ax``, only panel (A) is drawn, into ``ax``.

    Returns
    -------
    The list of Axes (A, B, C and with ``groupby`` D; or the one given ``ax``) when not
    shown; the Figure with ``return_fig``.
    """
    res = _gap_results(adata, key)
    if ax is not None:
        _means(ax, res)
        return finish(ax.figure, ax, show=show, return_fig=return_fig, ax_given=True)
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs.")
    gap = adata.obs[f"{key}_amortization_gap"].to_numpy(dtype=float)
    done = np.isfinite(gap)
    lib_col = f"{key}_library_size"
    if lib_col not in adata.obs:
        raise KeyError(f"adata.obs[{lib_col!r}] not found; rerun sv.tl.amortization_gap(adata, key={key!r}).")
    split = _split_of_cells(adata, key)[done]
    g, se = gap[done], adata.obs[f"{key}_amortization_gap_se"].to_numpy(dtype=float)[done]
    lib = adata.obs[lib_col].to_numpy(dtype=float)[done]
    mosaic = "AB;CD" if groupby else "AA;BC"
    n_groups = adata.obs[groupby].nunique() if groupby else 0
    fig, axd = plt.subplot_mosaic(mosaic, figsize=(12.5, 8.5 + 0.12 * max(0, n_groups - 10)), layout="constrained",
                                  height_ratios=[1, 1.25] if groupby else [0.7, 1])
    _means(axd["A"], res)
    _spread(axd["B"], g, se, split)
    _by_depth(axd["C"], g, lib, split)
    axes = [axd["A"], axd["B"], axd["C"]]
    if groupby:
        groups = adata.obs[groupby].astype(str).to_numpy()[done]
        _by_group(axd["D"], g, split, groups, groupby)
        axes.append(axd["D"])
    for letter, a in zip("ABCD", axes, strict=False):
        a.text(-0.01, 1.02, letter, transform=a.transAxes, fontweight="bold", fontsize="large", ha="right",
               va="bottom")
    return finish(fig, axes, show=show, return_fig=return_fig, ax_given=False)
