"""``pl.latent``: the embedding of the VAE latent space, drawn by scanpy."""

from __future__ import annotations

import scanpy as sc
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from ._utils import finish


@doc_params()
def latent(
    adata: AnnData,
    *,
    key: str = "vae",
    color=None,
    basis: str = "umap",
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs,
):
    """Plot an embedding (UMAP by default) of the latent space ``obsm["X_" + key]``.

    When ``obsm["X_" + basis]`` is missing, the kNN graph is built on the latent space
    (``sc.pp.neighbors(use_rep="X_" + key)``) and UMAP is run, and this is logged. When an
    existing UMAP was not computed from this latent space, a warning says so.

    Parameters
    ----------
    {adata}
    {key}
    color
        Keys of ``obs`` or genes to colour by, as in :func:`scanpy.pl.embedding`.
    basis
        Embedding in ``obsm["X_" + basis]``.
    {plot_common}
    **kwargs
        Passed to :func:`scanpy.pl.embedding`.

    Returns
    -------
    The Axes (a list with several ``color`` keys) when not shown; the Figure with ``return_fig``.
    """
    rep = f"X_{key}"
    if rep not in adata.obsm:
        raise KeyError(f"adata.obsm[{rep!r}] not found; run sv.tl.vae(adata, key_added={key!r}) first.")
    neighbors = adata.uns.get("neighbors", {})
    if f"X_{basis}" not in adata.obsm:
        if basis != "umap":  # only UMAP is computed here; checked before anything is written
            raise KeyError(f"adata.obsm['X_{basis}'] not found; compute that embedding first.")
        if neighbors.get("params", {}).get("use_rep") != rep:
            logg.info(f"computing neighbors on {rep!r} (not present), writing adata.uns['neighbors']")
            sc.pp.neighbors(adata, use_rep=rep)
        logg.info("computing UMAP of the latent space (not present)")
        sc.tl.umap(adata)
    elif basis == "umap" and neighbors.get("params", {}).get("use_rep") != rep:
        logg.warning(
            f"adata.obsm['X_umap'] exists but adata.uns['neighbors'] was not computed on {rep!r}: "
            f"the plot may show another representation. Run sc.pp.neighbors(adata, use_rep={rep!r}) "
            "and sc.tl.umap(adata) to be sure."
        )
    out = sc.pl.embedding(adata, basis=basis, color=color, ax=ax, show=False, return_fig=return_fig, **kwargs)
    if return_fig:
        return out
    fig = (out[0] if isinstance(out, list) else out).figure
    return finish(fig, out, show=show, return_fig=False, ax_given=ax is not None)
