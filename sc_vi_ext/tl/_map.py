"""``tl.vae_map``: map query cells onto a trained reference (scArches-style architecture surgery)."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from ..dataloader import Minibatches
from ..inputs import batch_codes_as, get_counts, inspect_counts, log_library
from ..model_store import get_model, state_to_numpy, stored_categories, stored_names
from ..module import VAE
from ..module.nn import FCLayers
from ..threads import cpu_threads
from ..train import EVAL_BATCH_SIZE, train
from ._derived import remove_derived
from ._shared import check_free
from ._utils import latent_means, resolve_device, set_library_prior, split_indices


def _grow_batches(ref: VAE, n_new: int) -> tuple[VAE, list]:
    """Return a copy of ``ref`` with ``n_new`` more batch categories; only their weights can train.

    The copy is built from the reference's hyperparameters. Covariates enter the Linear layer
    of every block of a network that is given them: the batch one-hot block grows by ``n_new``
    columns (initialised at zero, so a new batch starts as "no batch effect"), and a gradient
    mask keeps every reference column fixed (Lotfollahi et al. 2022, scArches). Per-batch
    dispersions and library priors get rows for the new batches (the reference's mean). All
    other parameters are frozen.
    """
    old_nb = max(ref.n_batch, 1)
    module = VAE(**{**ref.hparams, "n_batch": old_nb + n_new})
    fed = {id(block[0].weight) for m in module.modules() if isinstance(m, FCLayers) and m.n_cat for block in m.layers}
    params = dict(module.named_parameters())
    per_batch = {"library_prior_mean", "library_prior_log_var"} | ({"log_theta"} if ref.dispersion == "gene-batch"
                                                                   else set())
    old_state, new_state = ref.state_dict(), module.state_dict()
    masks = []
    for name, new in new_state.items():
        old = old_state[name]
        if name in params and id(params[name]) in fed:  # inputs: features, then the batch one-hot
            n_ref_cols = old.shape[1]
            new.zero_()
            new[:, :n_ref_cols] = old
            mask = torch.zeros_like(new)
            mask[:, n_ref_cols - ref.n_batch + old_nb:] = 1  # only the new batches' columns
            masks.append((name, mask))
        elif name in per_batch:
            new[:old.shape[0]] = old
            new[old.shape[0]:] = old.mean(0)
            if name in params:
                mask = torch.zeros_like(new)
                mask[old.shape[0]:] = 1
                masks.append((name, mask))
        else:
            new.copy_(old)
    module.load_state_dict(new_state)
    for p in module.parameters():
        p.requires_grad_(False)
    for name, mask in masks:
        p = params[name]
        p.requires_grad_(True)
        p.register_hook(lambda g, m=mask: g * m)
    return module, [n for n, _ in masks]


@doc_params()
@cpu_threads
def vae_map(
    adata: AnnData,
    *,
    reference: AnnData,
    key: str = "vae",
    max_epochs: int = 50,
    batch_size: int = 128,
    lr: float = 1e-3,
    train_size: float = 0.9,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Map query cells onto the latent space of a trained reference model.

    Genes are aligned to the reference by name (reference genes missing from the query
    are treated as zero counts and reported; query-only genes are ignored). Batches of
    the query that the reference never saw get new batch weights, which are the only
    parameters fine-tuned (for ``max_epochs`` with early stopping); everything else,
    BatchNorm statistics included, stays as in the reference, so the query lands in the
    reference's latent space. Without new batches, the reference encoder is applied as is.

    Parameters
    ----------
    {adata}
        The query, with raw counts in the reference's ``layer`` and its ``batch_key``.
    reference
        AnnData holding the trained model in ``uns[key]`` (and its genes in ``var_names``).
    {key}
    max_epochs
        Fine-tuning epochs for new batches.
    {batch_size}
    lr
        Learning rate of the fine-tuning.
    train_size
        Fraction of query cells for fine-tuning; the rest are held out for early stopping.
    {random_state}
    {device}
    {progress}
    {copy}

    Returns
    -------
    None, or a copy of the query with ``copy=True``; writes

    ``adata.obsm["X_" + key]``
        Latent means in the reference's latent space.
    ``adata.uns[key]``
        The mapped model (as :func:`vae` writes it, so that :func:`~sc_vi_ext.get_model`,
        :func:`amortization_gap` and :func:`log_likelihood` work on the query), with
        ``var_names`` (the model's genes), ``gene_index`` (query column of each of them at
        mapping time, -1 when absent: those genes stay zeros for every later tool) and
        ``mapping``: ``n_genes_missing``, ``missing_genes`` (first 50), ``new_batches``,
        ``trained_parameters`` and the fine-tuning ``history``.
    """
    ref_uns = reference.uns.get(key)
    if ref_uns is None or "model" not in ref_uns:
        raise KeyError(f"reference.uns[{key!r}] holds no trained model; run sv.tl.vae(reference, key_added={key!r}).")
    p = dict(ref_uns["params"], precision="float32")  # the reference's settings; the query's fine-tuning is float32
    check_free(adata, key, "obsm", f"X_{key}")  # the query's slots of another key stay
    check_free(adata, key, "uns", key)
    ref_module = get_model(reference, key)
    # the model's own genes (older models stored none: then the reference's var_names)
    ref_genes = stored_names(ref_uns.get("var_names", reference.var_names))
    gene_index = _gene_index(adata, ref_genes)
    n_missing = int((gene_index < 0).sum())
    X = get_counts(adata, p["layer"], use_raw=bool(p.get("use_raw", False)))  # where the reference read its counts
    counts = inspect_counts(X, "the query counts (in the reference's genes)", gene_index)
    if p.get("n_cov"):
        raise NotImplementedError("Mapping a model with extra covariates is not supported yet.")
    ref_cats = list(stored_names(ref_uns["batch_categories"]))
    codes, new = batch_codes_as(adata, p["batch_key"], ref_cats)
    adata = adata.copy() if copy else adata
    start = logg.info(f"mapping {adata.n_obs} query cells onto {key!r}")
    if n_missing:
        logg.warning(f"{n_missing} of {len(gene_index)} reference genes are absent from the query; "
                     "they are treated as zero counts.")
    dev = resolve_device(device)
    common = {"log_library": log_library(adata, counts.totals, p.get("size_factor_key")), "batch": codes,
              "device": dev, "gene_index": gene_index, **counts.read_options}
    history, trained = {}, []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        if new:
            module, trained = _grow_batches(ref_module, len(new))
            if module.library == "latent":
                _new_library_priors(module, counts.totals, codes, len(ref_cats))
            res, va_idx = _fine_tune(module.to(dev), X, common, train_size=train_size, random_state=random_state,
                                     max_epochs=max_epochs, batch_size=batch_size, lr=lr, progress=progress)
            history = {k: np.asarray(v) for k, v in res.history.items()}
        else:
            module, va_idx = ref_module.to(dev), np.array([], dtype=int)
        latent = latent_means(module, Minibatches(X, np.arange(adata.n_obs), batch_size=EVAL_BATCH_SIZE, **common))
    remove_derived(adata, key)
    adata.obsm[f"X_{key}"] = latent
    adata.uns[key] = _record(adata, ref_uns, p, ref_genes, gene_index, counts, module, va_idx,
                             {"new_batches": new, "trained_parameters": trained, "history": history})
    logg.info("    finished", time=start, deep=f"added\n    'X_{key}', latent means (adata.obsm)\n"
              f"    '{key}', the mapped model (adata.uns)")
    return adata if copy else None


def _record(adata: AnnData, ref_uns, params: dict, ref_genes, gene_index, counts, module: VAE, va_idx,
            mapping: dict) -> dict:
    """Return what ``uns[key]`` holds: the reference's record with the mapped model (see :func:`vae_map`)."""
    return {
        "params": params,
        "history": dict(ref_uns["history"]),
        "validation_obs_names": np.asarray(adata.obs_names[va_idx], dtype=object),
        "batch_categories": list(stored_names(ref_uns["batch_categories"])) + mapping["new_batches"],
        "covariate_categories": stored_categories(ref_uns.get("covariate_categories")) or {},
        "model": state_to_numpy(module),
        "best_epoch": ref_uns["best_epoch"],
        "stopped_early": ref_uns["stopped_early"],
        "interrupted": ref_uns["interrupted"],
        "var_names": np.asarray(ref_genes, dtype=object),
        "gene_index": gene_index,
        "counts_rounded": {"n_values": counts.n_rounded, "max_deviation": counts.max_deviation},
        "mapping": {
            "n_genes_missing": int((gene_index < 0).sum()),
            "missing_genes": list(ref_genes[gene_index < 0][:50]),
            **mapping,
        },
    }


def _gene_index(adata: AnnData, ref_genes: np.ndarray) -> np.ndarray:
    """Column of the query for each reference gene, -1 where the query lacks it."""
    if not adata.var_names.is_unique:
        dup = list(adata.var_names[adata.var_names.duplicated()].unique()[:5])
        raise ValueError(f"The query's var_names are not unique (e.g. {dup}), so its genes cannot be matched to "
                         "the reference's by name; run adata.var_names_make_unique() first.")
    gene_index = adata.var_names.get_indexer(ref_genes)
    if (gene_index < 0).all():
        raise ValueError("The query shares no genes with the reference (compare var_names).")
    return gene_index


def _new_library_priors(module: VAE, totals: np.ndarray, codes: np.ndarray, n_ref: int) -> None:
    """Set the latent-library priors of the new batches (codes >= ``n_ref``) from the query's cells."""
    fresh = codes >= n_ref  # the reference's batches and its trained library encoder stay as they are
    set_library_prior(module, np.log(totals[fresh]), codes[fresh], init_encoder=False)


def _fine_tune(module: VAE, X, common: dict, *, train_size, random_state, max_epochs, batch_size, lr, progress):
    """Train the new batches' weights (BatchNorm frozen); return the result and the held-out cells."""
    rng = np.random.default_rng(random_state)
    tr_idx, va_idx = split_indices(X.shape[0], train_size, rng)
    res = train(
        module,
        Minibatches(X, tr_idx, batch_size=batch_size, shuffle=True, rng=rng, with_nz=True, **common),
        Minibatches(X, va_idx, batch_size=EVAL_BATCH_SIZE, with_nz=True, **common) if len(va_idx) else None,
        max_epochs=max_epochs, lr=lr, weight_decay=0.0, n_epochs_kl_warmup=0, early_stopping=True,
        patience=10, seed=random_state, progress=progress, freeze_batchnorm=True,
    )
    for prm in module.parameters():
        prm.requires_grad_(True)
    return res, va_idx
