"""``tl.vae``: train the amortized VAE on an AnnData in one call."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from ..acceleration import COMPILE_MIN_STEPS, Precision, check_precision, resolve_precision
from ..dataloader import Minibatches
from ..distributed import device_for_rank, rank_and_world
from ..inputs import COUNT_RTOL, TrainingData, read_training_data
from ..model_store import state_to_numpy
from ..module.vae import DEFAULTS, HPARAMS, VAE, Dispersion, LatentDistribution, Library, Likelihood, check_options
from ..threads import threads
from ..train import (
    EVAL_BATCH_SIZE,
    TRAINING_DEFAULTS,
    TrainingDivergedError,
    TrainResult,
    default_dropout,
    default_max_epochs,
    train,
)
from ._derived import remove_derived
from ._shared import check_free
from ._utils import latent_means, resolve_device, set_library_prior, split_indices


@doc_params(compile_min_steps=f"{COMPILE_MIN_STEPS:,}", count_rtol=f"{COUNT_RTOL:g}")
def vae(
    adata: AnnData,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    batch_key: str | None = None,
    n_latent: int = DEFAULTS["n_latent"],
    n_hidden: int = DEFAULTS["n_hidden"],
    n_layers: int = DEFAULTS["n_layers"],
    dropout: float | None = None,
    likelihood: Likelihood = DEFAULTS["likelihood"],
    dispersion: Dispersion = DEFAULTS["dispersion"],
    encode_covariates: bool = DEFAULTS["encode_covariates"],
    library: Library = DEFAULTS["library"],
    latent_distribution: LatentDistribution = DEFAULTS["latent_distribution"],
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    max_epochs: int | None = None,
    batch_size: int = TRAINING_DEFAULTS["batch_size"],
    lr: float = TRAINING_DEFAULTS["lr"],
    weight_decay: float = TRAINING_DEFAULTS["weight_decay"],
    n_epochs_kl_warmup: int | None = None,
    train_size: float = TRAINING_DEFAULTS["train_size"],
    early_stopping: bool = True,
    early_stopping_patience: int = TRAINING_DEFAULTS["early_stopping_patience"],
    gap_every: int | None = None,
    random_state: int = 0,
    key_added: str = "vae",
    device: str = "auto",
    n_threads: int | None = None,
    compile: bool | str = "auto",  # noqa: A002 - torch's word for it
    precision: Precision = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Train an scVI-style VAE on raw counts and store its latent space.

    The encoder is the amortized posterior q(z | x), a Gaussian on ``n_latent`` dimensions;
    the decoder gives a count likelihood whose mean is the softmax over genes times the
    observed library size (Lopez et al. 2018). Training maximises the ELBO with Adam, a
    linear KL warm-up, and early stopping on the ELBO of held-out cells; the weights of the
    best validation epoch are kept.

    Parameters
    ----------
    {adata}
    layer
        Layer with raw counts; ``adata.X`` when None. Dense, CSR or CSC, int or float;
        floats within {count_rtol} (relative) of an integer, as CSV files often hold, are used
        rounded (the AnnData is not modified).
    use_raw
        Train on the counts in ``adata.raw`` (as CELLxGENE files hold them, with ``adata.X``
        normalised): those of the genes of ``adata.var_names``, which may be fewer than
        raw's. The tools that apply the model read them there too. Not with ``layer``.
    batch_key
        Column of ``adata.obs`` with batch labels, injected into the decoder (and the
        encoder when ``encode_covariates``).
    n_latent
        Dimension of the latent space.
    n_hidden
        Units per hidden layer.
    n_layers
        Hidden layers in encoder and decoder.
    dropout
        Dropout rate in the encoder. None: by data size, 0.4 below 10,000 cells (where an
        encoder with scvi-tools' 0.1 memorises its training cells: the held-out cells'
        amortization gap opens and the latent clusters worse than PCA, see ``docs/training.md``),
        0.1 from 10,000 cells on. ``params["dropout"]`` records the rate used.
    likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` (one inverse dispersion per gene), ``"gene-batch"`` (per gene and batch)
        or ``"gene-cell"`` (per gene and cell, from the decoder).
    encode_covariates
        Also give the batch one-hot to the encoder.
    library
        ``"observed"``: the library size is each cell's total count (or size factor);
        ``"latent"``: a latent log library size with a per-batch normal prior whose mean
        and variance are those of the log total counts of the batch's training cells; it
        enters the ELBO and every log p(x) estimate.
    latent_distribution
        ``"normal"``, or ``"ln"`` (logistic normal: the decoder sees softmax(z), and
        ``obsm`` holds the softmax of the latent mean).
    size_factor_key
        Column of ``adata.obs`` with a size factor to use as the observed library size
        instead of the total counts.
    categorical_covariate_keys
        Columns of ``adata.obs`` with further categorical covariates (one-hot encoded),
        injected into the decoder (and the encoder with ``encode_covariates``).
    continuous_covariate_keys
        Columns of ``adata.obs`` with continuous covariates, injected likewise.
    max_epochs
        Epoch budget. None: ``min(400, max(20, round(2e6 / n_obs)))``, about two million
        cell passes (400 epochs for 5,000 cells or fewer, 100 for 20,000, 20 from 100,000).
    batch_size
        Cells per training minibatch (256: scvi-tools' 128 doubled, with the learning rate
        scaled with it; measured to give the same quality in fewer, cheaper steps).
    lr
        Adam learning rate (scale it with ``batch_size``).
    weight_decay
        Adam weight decay.
    n_epochs_kl_warmup
        Epochs over which the KL weight grows linearly from 0 to 1 (per step). None: a
        quarter of ``max_epochs``, so the real objective is reached whatever the data size.
    train_size
        Fraction of cells used for training; the rest are held out for validation and
        early stopping. 1.0 trains on all cells (early stopping then watches the training ELBO).
    early_stopping
        Stop when the validation ELBO has not improved for ``early_stopping_patience``
        epochs after the warm-up.
    early_stopping_patience
        Epochs without improvement before stopping.
    gap_every
        Every this many epochs, record the amortization and approximation gaps on small
        fixed subsets of training and held-out cells (see :func:`amortization_gap`), and
        warn when the held-out amortization gap ends up well beyond the training one
        (more than twice, and by more than 2 standard errors): the encoder overfits.
    {random_state}
    key_added
        Name of the result: ``obsm["X_" + key_added]`` and ``uns[key_added]``.
    {device}
    {n_threads}
    compile
        Fuse the likelihood's element-wise terms with ``torch.compile`` instead of the fused
        kernel (:mod:`sc_vi_ext.module.fast_counts`, numba: softmax, library, likelihood and
        gradient in one pass, no compiler needed), which is faster on CPU where it applies.
        ``"auto"`` compiles only where the kernel does not apply (a per-cell dispersion, a
        GPU), the run has at least {compile_min_steps} optimiser steps (compiling takes 5-20 s)
        and a C++ compiler is available; results equal the eager ones to float32 rounding.
    precision
        ``"bfloat16"``: the training steps' matrix products in bfloat16 (their outputs are
        rounded to bfloat16, everything after them is float32; on CPU the layers with fewer
        than 2^16 weights stay float32 where the step is written out, see
        :mod:`sc_vi_ext.module.fast_step`, and all go through torch autocast elsewhere), for CPUs with
        bfloat16 instructions (AVX-512 BF16, AMX) and GPUs. The weights, the optimiser, the
        validation ELBO and every tool after training stay float32; ``elbo_train`` in the
        history comes from the bfloat16 steps. ``"auto"``: bfloat16 where the hardware
        multiplies bfloat16 natively (those CPUs, a CUDA GPU with bfloat16), else float32;
        ``params["precision"]`` records which ran. Speed and quality are measured in
        ``benchmarks/RESULTS.md``.
    {progress}
    {copy}

    Returns
    -------
    None, or a copy of ``adata`` when ``copy=True``; writes

    ``adata.obsm["X_" + key_added]``
        Latent means of q(z | x), float32 (cells x ``n_latent``).
    ``adata.uns[key_added]["params"]``
        Every setting of this call.
    ``adata.uns[key_added]["history"]``
        Per epoch: ``epoch``, ``elbo_train``, ``elbo_validation``, ``reconstruction_train``,
        ``reconstruction_validation``, ``kl_train``, ``kl_validation`` (nats per cell,
        unweighted), ``kl_weight`` and ``seconds`` (wall time of the epoch); with
        ``gap_every`` also ``amortization_gap_train``, ``amortization_gap_validation``,
        ``approximation_gap_train``, ``approximation_gap_validation`` and their standard
        errors (``..._se``), NaN at epochs without a measurement.
    ``adata.uns[key_added]["validation_obs_names"]``
        Names of the held-out cells (names, so that subsets of ``adata`` keep them).
    ``adata.uns[key_added]["model"]``, ``["var_names"]``
        Trained weights as numpy arrays, and the genes they belong to (every tool applying
        the model matches genes by these names); rebuild with :func:`sc_vi_ext.get_model`.
    ``adata.uns[key_added]["counts_rounded"]``
        ``n_values`` and ``max_deviation`` of the float noise rounded away (zeros for integers).
    ``adata.uns[key_added]["batch_categories"]``, ``["covariate_categories"]``
        Training bookkeeping.
    ``adata.uns[key_added]["best_epoch"]``, ``["stopped_early"]``, ``["interrupted"]``
        Training bookkeeping.

    Results of an earlier model under ``key_added`` that other tools derived from it
    (gap, refine, normalised-expression, posterior-predictive and DE results) are removed,
    and the removal is logged. A NaN or infinite ELBO raises
    :class:`~sc_vi_ext.train.TrainingDivergedError`, and Ctrl-C before the first epoch
    has finished raises :class:`~sc_vi_ext.train.TrainingInterrupted`; in both cases
    ``adata`` is left as it was.
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "copy")}
    # every check runs before anything is written, so bad input leaves adata untouched
    if batch_size < 2:
        raise ValueError("batch_size must be at least 2 (BatchNorm needs two cells).")
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1) or None (chosen by data size), not {dropout!r}.")
    check_options(likelihood=likelihood, dispersion=dispersion, library=library,
                  latent_distribution=latent_distribution)
    check_precision(precision)
    check_free(adata, key_added, "obsm", f"X_{key_added}")  # another key's result is never overwritten
    check_free(adata, key_added, "uns", key_added)
    data = read_training_data(adata, layer=layer, use_raw=use_raw, batch_key=batch_key, size_factor_key=size_factor_key,
                              categorical_keys=categorical_covariate_keys, continuous_keys=continuous_covariate_keys)
    adata = adata.copy() if copy else adata

    start = logg.info(f"training VAE on {adata.n_obs} cells x {adata.n_vars} genes")
    dev = device_for_rank(resolve_device(device))
    max_epochs = default_max_epochs(adata.n_obs) if max_epochs is None else int(max_epochs)
    warmup = max(1, max_epochs // 4) if n_epochs_kl_warmup is None else int(n_epochs_kl_warmup)
    dropout = default_dropout(adata.n_obs) if dropout is None else float(dropout)
    params.update(n_genes=adata.n_vars, max_epochs=max_epochs, n_epochs_kl_warmup=warmup, device=dev, dropout=dropout,
                  precision=resolve_precision(precision, dev),
                  world_size=rank_and_world()[1], n_cov=0 if data.cov is None else data.cov.shape[1])

    rng = np.random.default_rng(random_state)
    train_idx, val_idx = split_indices(adata.n_obs, train_size, rng)
    common = {"log_library": data.log_lib, "batch": data.codes, "cov": data.cov, "device": dev,
              **data.counts.read_options}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        module = _build_module(params, data, train_idx).to(dev)
        res = _fit(module, data, train_idx, val_idx, rng, params, common)
        latent = latent_means(module, Minibatches(data.X, np.arange(adata.n_obs), batch_size=EVAL_BATCH_SIZE, **common))
    state = state_to_numpy(module)
    # never write NaN: the loop checks the ELBO per epoch; the weights and latent are checked here
    finite = bool(np.isfinite(latent).all()) and all(bool(np.isfinite(v).all()) for v in state.values())
    if not finite:
        raise TrainingDivergedError(
            f"Training produced non-finite weights or latent coordinates (learning rate {lr:g}). Nothing was "
            f"written. Train again with a smaller learning rate (e.g. lr={lr / 2:g}).")

    remove_derived(adata, key_added)
    adata.obsm[f"X_{key_added}"] = latent
    adata.uns[key_added] = _record(adata, params, data, res, state, val_idx)
    _report(res, gap_every, key_added, start)
    return adata if copy else None


def _build_module(params: dict, data: TrainingData, train_idx: np.ndarray) -> VAE:
    """Build the VAE of this call's settings; its latent-library prior from the training cells (global torch RNG)."""
    module = VAE(n_batch=len(data.categories), **{k: params[k] for k in HPARAMS if k in params})
    empty = set_library_prior(module, np.log(data.counts.totals[train_idx]),
                              None if data.codes is None else data.codes[train_idx], pool_empty=True)
    if empty and data.codes is not None:
        names = [data.categories[b] for b in empty]
        warnings.warn(
            f"Batch(es) {names} of adata.obs[{params['batch_key']!r}] have no training cells (all their cells are "
            "held out): the model learns nothing of them, and their latent-library prior is that of all training "
            "cells. Hold out fewer cells (a larger train_size, or train_size=1.0) to train on them.",
            UserWarning, stacklevel=3)  # the line of the sv.tl.vae call
    return module


def _fit(module: VAE, data: TrainingData, train_idx, val_idx, rng, params: dict, common: dict) -> TrainResult:
    """Train ``module`` in place on ``train_idx``, validating on ``val_idx`` (the settings in ``params``)."""
    p = params
    train_loader = Minibatches(data.X, train_idx, batch_size=p["batch_size"], shuffle=True, rng=rng, with_nz=True,
                               shard=rank_and_world(), **common)
    # data-parallel: each rank evaluates its share of the held-out cells (sums all-reduced)
    val_loader = (Minibatches(data.X, val_idx, batch_size=EVAL_BATCH_SIZE, shard=rank_and_world(), with_nz=True,
                              **common) if len(val_idx) else None)
    callback = None
    if p["gap_every"]:
        from ..diagnostics.history import GapTracker

        callback = GapTracker(data.X, train_idx, val_idx, every=p["gap_every"], seed=p["random_state"], **common)
    with threads(p["n_threads"]) as used:
        params["n_threads_used"] = used  # results are bit-reproducible for a given seed and thread count
        return train(
            module, train_loader, val_loader, max_epochs=p["max_epochs"], lr=p["lr"], weight_decay=p["weight_decay"],
            n_epochs_kl_warmup=p["n_epochs_kl_warmup"], early_stopping=p["early_stopping"],
            patience=p["early_stopping_patience"], seed=p["random_state"], progress=p["progress"],
            callback=callback, compile_likelihood=p["compile"], precision=p["precision"],
        )


def _record(adata: AnnData, params: dict, data: TrainingData, res: TrainResult, state: dict, val_idx) -> dict:
    """Return what ``uns[key_added]`` holds (see the docstring of :func:`vae`)."""
    return {
        "params": params,
        "history": {k: np.asarray(v) for k, v in res.history.items()},
        "validation_obs_names": np.asarray(adata.obs_names[val_idx], dtype=object),
        "batch_categories": data.categories,
        "covariate_categories": data.cov_categories,
        "model": state,
        "var_names": np.asarray(adata.var_names, dtype=object),
        "counts_rounded": {"n_values": data.counts.n_rounded, "max_deviation": data.counts.max_deviation},
        "best_epoch": res.best_epoch, "stopped_early": res.stopped_early, "interrupted": res.interrupted,
    }


def _report(res: TrainResult, gap_every, key_added: str, start) -> None:
    """Warn when the encoder overfits (with ``gap_every``) and log the outcome."""
    if gap_every:
        from ..diagnostics.history import overfitting_alarm

        alarm = overfitting_alarm(res.history, best_epoch=res.best_epoch)
        if alarm:
            warnings.warn(alarm, UserWarning, stacklevel=3)
    if res.summary():
        logg.info(f"    {res.summary()}")
    logg.info("    finished", time=start, deep=(f"added\n    'X_{key_added}', latent means (adata.obsm)"
                                                 f"\n    '{key_added}', params, history and weights (adata.uns)"))
