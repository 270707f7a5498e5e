"""``tl.normalized_expression``: denoised, optionally batch-corrected expression from the decoder."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._progress import tqdm
from ..model_store import gene_alignment, stored_loader, stored_names
from ..module import VAE
from ..threads import cpu_threads
from ._shared import check_free, sample_latent
from ._utils import stored_model

_WARN_BYTES = 2 * 1024**3  # warn before materialising a result larger than this


def batch_targets(adata: AnnData, key: str, module: VAE, transform_batch) -> list[int] | None:
    """Batch codes to decode with: None keeps each cell's own batch.

    ``transform_batch`` is a category name or a list of them.
    """
    if transform_batch is None:
        return None
    names = [transform_batch] if isinstance(transform_batch, str) else list(transform_batch)
    if not module.n_batch:
        raise ValueError(f"The model under {key!r} has no batch covariate; transform_batch must be None.")
    cats = list(stored_names(adata.uns[key]["batch_categories"]))
    unknown = [str(n) for n in names if str(n) not in cats]
    if unknown or not names:
        raise ValueError(f"transform_batch {unknown or names} not among the model's batches {cats}.")
    return [cats.index(str(n)) for n in names]


def all_batches(module: VAE) -> list[int] | None:
    """Every batch code of the model (batch-corrected averaging), or None without batches."""
    return list(range(module.n_batch)) if module.n_batch else None


def decode_scale(module: VAE, z: torch.Tensor, codes: list[int] | None, batch: torch.Tensor | None,
                 cov: torch.Tensor | None = None) -> torch.Tensor:
    """Gene proportions (the decoder's softmax) for latent ``z`` (..., cells, latent_dim).

    With ``codes``, the batch one-hot is set to each code in turn and the proportions are
    averaged; with None, each cell keeps its own batch ``batch``. Extra covariates ``cov``
    stay the cells' own.
    """
    if codes is None:
        return module.scale(z, batch, cov)
    n_cells = z.shape[-2]
    out = None
    for c in codes:
        b = torch.full((n_cells,), c, dtype=torch.long, device=z.device)
        h = module.scale(z, b, cov)
        out = h if out is None else out + h
    return out / len(codes)


def gene_positions(model_genes: np.ndarray, genes) -> np.ndarray:
    """Positions of ``genes`` (names) among the model's genes; KeyError naming the unknown ones."""
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("gene_subset is empty.")
    pos = pd.Index(model_genes).get_indexer(genes)
    if (pos < 0).any():
        missing = [g for g, p in zip(genes, pos, strict=True) if p < 0]
        raise KeyError(f"{len(missing)} gene(s) not in adata.var_names (or not genes of the model): {missing[:10]}")
    return pos


def layer_columns(adata: AnnData, key: str, model_genes: np.ndarray, gene_index) -> np.ndarray | None:
    """For each gene of ``adata``, its column among the model's genes (None: the same genes in order).

    A layer needs a value for every gene of ``adata``, so genes the model lacks are an error.
    """
    if gene_index is None:
        return None
    pos = pd.Index(model_genes).get_indexer(adata.var_names)
    if (pos < 0).any():
        extra = list(adata.var_names[pos < 0][:5])
        raise ValueError(
            f"{int((pos < 0).sum())} gene(s) of adata are not genes of the model under {key!r} (e.g. {extra}), so a "
            "layer cannot hold the result; pass gene_subset= with genes of the model (written to obsm), or subset "
            "adata to the model's genes."
        )
    return pos


@doc_params()
@cpu_threads
def normalized_expression(
    adata: AnnData,
    *,
    key: str = "vae",
    transform_batch: str | Sequence[str] | None = None,
    library_size: float = 1e4,
    n_samples: int = 1,
    gene_subset: Sequence[str] | None = None,
    layer_added: str = "vae_normalized",
    batch_size: int = 256,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Denoised expression: the decoder's gene proportions times a common library size.

    For each cell, latent draws z ~ q(z | x) are decoded to the softmax over genes
    rho(z, s) (the expected fraction of the cell's counts per gene, Lopez et al. 2018), which
    is averaged over the draws and multiplied by ``library_size``. As in scvi-tools, one
    posterior draw is used by default (``n_samples=1``), so the result is a random
    draw; ``n_samples=0`` decodes the posterior mean of z instead (deterministic), and
    larger ``n_samples`` approach the posterior mean of rho. With ``transform_batch`` the
    decoder's batch covariate s is set to that batch for every cell (a list: rho is
    averaged over those batches), which removes the batch effect the decoder learned;
    otherwise each cell is decoded with its own batch.

    The result is streamed minibatch by minibatch into one preallocated dense float32
    array of cells x genes; a warning gives its size first when it exceeds 2 GiB (pass
    ``gene_subset`` to keep fewer genes).

    Parameters
    ----------
    {adata}
    {key}
    transform_batch
        A batch category of the model (``adata.uns[key]["batch_categories"]``), or a list
        of them to average over; None decodes each cell with its own batch.
    library_size
        Counts per cell the proportions are scaled to (rows sum to it over all genes).
    n_samples
        Posterior draws of z averaged per cell; 0 decodes the mean of q(z | x).
    gene_subset
        Names of the genes to keep; all genes when None.
    layer_added
        Name of the result in ``layers`` (all genes) or ``obsm`` (a gene subset).
    {apply_model}

    Returns
    -------
    None, or a copy with ``copy=True``; writes

    ``adata.layers[layer_added]``
        Without ``gene_subset``: the normalised expression, float32 cells x genes.
    ``adata.obsm[layer_added]``
        With ``gene_subset`` (a layer must hold every gene): float32 cells x genes of the
        subset, in the order given.
    ``adata.uns[key]["normalized_expression"][layer_added]``
        ``params`` of this call, ``slot`` (``"layers"`` or ``"obsm"``) and, with a gene
        subset, ``var_names``: the genes of the ``obsm`` columns.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, not {n_samples}.")
    module, dev = stored_model(adata, key, device)
    codes = batch_targets(adata, key, module, transform_batch)
    model_genes, gene_index = gene_alignment(adata, key)
    # output columns, as positions among the model's genes (None: all, in the model's order)
    genes = layer_columns(adata, key, model_genes, gene_index) if gene_subset is None else \
        gene_positions(model_genes, gene_subset)
    params = {"key": key, "transform_batch": None if transform_batch is None else
              [stored_names(adata.uns[key]["batch_categories"])[c] for c in codes], "library_size": float(library_size),
              "n_samples": int(n_samples), "random_state": random_state}
    check_free(adata, key, "layers" if gene_subset is None else "obsm", layer_added)
    adata = adata.copy() if copy else adata
    n_out = module.n_genes if genes is None else len(genes)
    size = adata.n_obs * n_out * 4
    if size > _WARN_BYTES:
        logg.warning(f"normalized_expression materialises a dense {adata.n_obs} x {n_out} float32 array "
                     f"({size / 1024**3:.1f} GiB) in adata.{'layers' if genes is None else 'obsm'}; "
                     f"pass {'gene_subset' if genes is None else 'a smaller gene_subset'} to keep fewer genes.")
    start = logg.info(f"computing normalized expression of {key!r} on {adata.n_obs} cells x {n_out} genes")
    out = np.empty((adata.n_obs, n_out), dtype=np.float32)
    gen = torch.Generator(device=dev).manual_seed(random_state)
    loader = stored_loader(adata, key, batch_size=batch_size, device=dev)
    with torch.no_grad():
        for mb in tqdm(loader, desc="normalized expression", unit="batch", disable=not progress, leave=False):
            mean, log_var = module.inference(mb.x, mb.batch, mb.cov)
            if n_samples == 0:
                h = decode_scale(module, mean, codes, mb.batch, mb.cov)
            else:
                h = 0
                for _ in range(n_samples):  # one draw at a time: memory stays cells x genes
                    h = h + decode_scale(module, sample_latent(mean, log_var, 1, gen)[0], codes, mb.batch, mb.cov)
                h = h / n_samples
            if genes is not None:
                h = h[:, torch.from_numpy(genes).to(h.device)]
            out[mb.idx] = (h * library_size).cpu().numpy()
    record = {"params": params, "slot": "layers" if gene_subset is None else "obsm"}
    if gene_subset is None:
        adata.layers[layer_added] = out
    else:
        adata.obsm[layer_added] = out
        record["var_names"] = np.asarray(model_genes[genes], dtype=object)
    adata.uns[key].setdefault("normalized_expression", {})[layer_added] = record
    logg.info("    finished", time=start, deep=f"added\n    {layer_added!r} (adata.{record['slot']})\n"
              f"    'normalized_expression' (adata.uns[{key!r}])")
    return adata if copy else None
