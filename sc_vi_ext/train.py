"""A plain training loop: Adam on the warm-up-weighted ELBO, exact validation, early stopping."""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ._progress import tqdm
from .acceleration import bf16_products, keep_freed_memory, matmul_precision, use_compiled, warm_up_compiled
from .dataloader import Minibatches
from .distributed import broadcast_buffers, global_sum, interruptible, rank_and_world, wrap
from .module import VAE, fast_counts, fast_step, fused

HISTORY_KEYS = (
    "epoch", "elbo_train", "elbo_validation", "reconstruction_train", "reconstruction_validation",
    "kl_train", "kl_validation", "kl_weight", "seconds",
)


# The training defaults of tl.vae and the CLI (the architecture's are the VAE's own). Batch 256
# with the learning rate scaled from scvi-tools' 1e-3 at 128 (linear scaling): the same quality
# on PBMC and on a 20k simulation in fewer, cheaper steps (measured against batch 128).
EVAL_BATCH_SIZE = 1024  # cells per minibatch where nothing is trained (validation, the latent of all cells)
TRAINING_DEFAULTS = {"batch_size": 256, "lr": 2e-3, "weight_decay": 1e-6, "train_size": 0.9,
                     "early_stopping_patience": 20}


def default_max_epochs(n_cells: int) -> int:
    """Epoch budget from the data size: about 2 million cell passes, between 20 and 400 epochs.

    Small data gets up to 400 epochs (as scvi-tools), 20,000 cells get 100 and 100,000 cells
    or more get 20; early stopping usually ends training sooner.
    """
    return int(min(400, max(20, round(2_000_000 / max(n_cells, 1)))))


# Encoder dropout by data size. On small data the encoder memorises its training cells: on the
# bundled 700 PBMCs at scvi-tools' 0.1 the held-out cells' amortization gap was 3.5x the training
# cells' and k-means on the latent trailed PCA; 0.4 halved that ratio, raised the held-out
# log p(x) and the clustering above PCA's (``python -m benchmarks training``). From
# SMALL_DATA_CELLS cells on, scvi-tools' 0.1 (the speed and scale benchmarks' setting).
SMALL_DATA_CELLS = 10_000
SMALL_DATA_DROPOUT, DROPOUT = 0.4, 0.1


def default_dropout(n_cells: int) -> float:
    """Return the encoder dropout for ``n_cells`` cells: 0.4 below ``SMALL_DATA_CELLS``, else 0.1 (scvi-tools')."""
    return SMALL_DATA_DROPOUT if n_cells < SMALL_DATA_CELLS else DROPOUT


def kl_weight(step: int, warmup_steps: int) -> float:
    """Linear KL warm-up from 0 to 1 over ``warmup_steps`` optimiser steps."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


class TrainingDivergedError(RuntimeError):
    """The ELBO became NaN or infinite: the weights are lost, so there is nothing to keep."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C before the first epoch finished: there is no model to keep."""


def check_finite(epoch: int, lr: float, *values: float) -> None:
    """Raise :class:`TrainingDivergedError` unless every epoch metric is finite."""
    if not all(math.isfinite(v) for v in values):
        raise TrainingDivergedError(
            f"Training diverged: the ELBO became NaN or infinite in epoch {epoch} (learning rate {lr:g}). "
            f"Nothing was written. Train again with a smaller learning rate (e.g. lr={lr / 2:g})."
        )


@dataclass
class TrainResult:
    history: dict[str, list] = field(default_factory=lambda: {k: [] for k in HISTORY_KEYS})
    best_epoch: int = -1
    stopped_early: bool = False
    interrupted: bool = False

    def summary(self) -> str:
        """One line: epochs run, early stop, the ELBOs of the best epoch (empty before any epoch)."""
        h = self.history
        if not h["epoch"]:
            return ""
        best = self.best_epoch - 1
        return (f"{len(h['epoch'])} epochs{' (early stop)' if self.stopped_early else ''}, best epoch "
                f"{self.best_epoch}: ELBO train {h['elbo_train'][best]:.1f}, validation "
                f"{h['elbo_validation'][best]:.1f} nats/cell")


@torch.no_grad()
def evaluate(module: VAE, loader: Minibatches, *, seed: int) -> dict[str, float]:
    """Mean per-cell ELBO terms over every cell of ``loader``, model in eval mode.

    The reparameterisation noise is drawn from a generator reset to ``seed`` so that
    successive epochs are compared with common random numbers.
    """
    was_training = module.training
    module.eval()
    broadcast_buffers(module)  # data-parallel: every rank evaluates with rank 0's BatchNorm statistics
    gen = torch.Generator(device=loader.device).manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64, device=loader.device)  # rec, kl, cells
    for mb in loader:
        if not len(mb.idx):  # a rank's share of a tiny last minibatch
            continue
        out = module.loss(mb.x, mb.batch, mb.log_library, cov=mb.cov, nz=mb.nz, generator=gen)
        sums[0] += out.reconstruction.sum().double()
        sums[1] += out.kl.sum().double()
        sums[2] += len(mb.idx)
    module.train(was_training)
    # data-parallel: each rank has its shard of the cells; the same global sums on every rank
    rec, kl, n = global_sum(sums).tolist()
    return {"reconstruction": rec / n, "kl": kl / n, "elbo": (rec - kl) / n}


def train(
    module: VAE,
    train_loader: Minibatches,
    val_loader: Minibatches | None,
    *,
    max_epochs: int,
    lr: float,
    weight_decay: float,
    n_epochs_kl_warmup: int,
    early_stopping: bool,
    patience: int,
    seed: int,
    progress: bool,
    callback=None,
    freeze_batchnorm: bool = False,
    compile_likelihood: bool | str = False,
    precision: str = "auto",
) -> TrainResult:
    """Train ``module`` in place and load the weights of the best validation epoch.

    Early stopping watches the validation ELBO (the training ELBO without held-out cells)
    once the KL warm-up is over. Ctrl-C stops training, keeps the best weights so far and
    returns the partial history with ``interrupted=True``; before the first epoch has
    finished there is nothing to keep, and :class:`TrainingInterrupted` (a KeyboardInterrupt)
    is raised. A NaN or infinite ELBO raises :class:`TrainingDivergedError` (checked on the
    per-epoch sums, so without a host sync per step). ``callback(epoch, module)``
    may return extra metrics for the history (a dict of floats). Only parameters that
    require gradients are optimised; ``freeze_batchnorm`` keeps BatchNorm layers on their
    stored running statistics (query mapping). ``compile_likelihood`` fuses the
    likelihood's dense terms with ``torch.compile`` (True, False, or "auto": where the fused
    kernel does not apply and the run has enough steps to repay the compile time, see
    :func:`sc_vi_ext.acceleration.use_compiled`). ``precision``
    ``"bfloat16"`` runs the training steps' matrix products in bfloat16 (autocast, or the written-out
    step's own casts, which keep layers with fewer than 2^16 weights in float32); the
    likelihood, the optimiser, the weights and the validation stay float32; ``"auto"``: bfloat16
    where the hardware has it (:func:`~sc_vi_ext.acceleration.resolve_precision`).
    """
    rank, _ = rank_and_world()
    keep_freed_memory()  # the steps' tensors are reused from the heap, not page-faulted in anew
    res = TrainResult()
    steps_per_epoch = len(train_loader)
    warmup_steps = n_epochs_kl_warmup * steps_per_epoch
    compiled = use_compiled(compile_likelihood, max_epochs * steps_per_epoch,
                            kernel=fast_counts.applies_to(module, train_loader.device))
    best, step = _BestEpoch(n_epochs_kl_warmup), 0
    raw_loader = train_loader
    autocast = matmul_precision(precision, train_loader.device)
    # under torchrun, Ctrl-C stops every rank at the same step (see distributed.py)
    train_loader, restore_sigint = interruptible(train_loader)
    bar = tqdm(range(max_epochs), desc="training VAE", unit="epoch", disable=not progress or rank > 0, leave=False)
    try:
        trainable = [p for p in module.parameters() if p.requires_grad]
        # eps=0.01 as scvi-tools; the fused kernel updates all parameters in one pass (CPU and CUDA)
        opt = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay, eps=0.01, fused=True)
        model = wrap(module)  # DistributedDataParallel under torchrun, else the module itself
        # the compiled likelihood for this training only; the caller's setting is restored after
        with fused.compiled_likelihood("train" if compiled else False):
            if compiled:
                warm_up_compiled(module, raw_loader, autocast)
            for epoch in bar:
                t0 = time.perf_counter()
                sums, step = _train_epoch(model, module, train_loader, opt, step, warmup_steps,
                                           freeze_batchnorm=freeze_batchnorm, autocast=autocast)
                rec, kl, n = global_sum(sums).tolist()
                tr = {"reconstruction": rec / n, "kl": kl / n}
                tr["elbo"] = tr["reconstruction"] - tr["kl"]
                va = evaluate(module, val_loader, seed=seed) if val_loader is not None else None
                check_finite(epoch + 1, lr, rec, kl, *(va.values() if va else ()))
                # seconds: training + validation, before callbacks
                row = _history_row(epoch + 1, tr, va, kl_weight(step, warmup_steps), time.perf_counter() - t0)
                if callback is not None:
                    row.update(callback(epoch + 1, module) or {})
                for k in row.keys() | res.history.keys():  # every column as long as the epoch column
                    res.history.setdefault(k, [np.nan] * epoch).append(row.get(k, np.nan))
                bar.set_postfix(elbo_train=f"{tr['elbo']:.1f}", **({"elbo_val": f"{va['elbo']:.1f}"} if va else {}))
                improved = best.update(epoch + 1, va["elbo"] if va else tr["elbo"], module)
                if not improved and early_stopping and best.bad_epochs >= patience:
                    res.stopped_early = True
                    break
    except KeyboardInterrupt:
        _keep_partial(res, best)
    finally:
        bar.close()
        restore_sigint()
    res.best_epoch = best.epoch
    if best.state is not None:
        module.load_state_dict(best.state)
    module.eval()
    return res


def _train_epoch(model, module: VAE, loader, opt, step: int, warmup_steps: int, *, freeze_batchnorm: bool,
                 autocast: torch.autocast):
    """One pass of optimiser steps over ``loader``; return the summed (reconstruction, KL, cells) and the step count.

    The sums stay on the device (no host sync per step). ``model`` is ``module`` or its
    data-parallel wrapper; the steps are :func:`train_step`'s.
    """
    module.train()
    if freeze_batchnorm:
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=loader.device)  # rec, kl, cells
    fast = model is module and uses_fast_step(module, loader.device)
    for mb in loader:
        out = train_step(model, module, mb, opt, kl_weight(step, warmup_steps), fast=fast, autocast=autocast)
        step += 1
        sums[0] += out.reconstruction.detach().sum()
        sums[1] += out.kl.detach().sum()
        sums[2] += len(mb.idx)
    return sums, step


def uses_fast_step(module: VAE, device) -> bool:
    """Whether the training steps of ``module`` (as it is now) take :func:`~sc_vi_ext.module.fast_step.elbo_and_grad`.

    Not where the compiled likelihood is on (``tl.vae(compile=True)``): that path goes through autograd.
    """
    return not fused.compiled_enabled() and fast_step.applies(module, device)


def train_step(model, module: VAE, mb, opt, kl_w: float, *, fast: bool, autocast: torch.autocast):
    """One optimiser step on minibatch ``mb`` at KL weight ``kl_w``; return its :class:`~sc_vi_ext.module.LossOutput`.

    ``fast`` (see :func:`uses_fast_step`): the ELBO and its gradient from
    :func:`~sc_vi_ext.module.fast_step.elbo_and_grad` (without autograd, at the precision of
    ``autocast``); else autograd through ``model`` under ``autocast``. The data layer's blocks are
    float32, as the kernel needs.
    """
    if fast:
        out = fast_step.elbo_and_grad(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, nz=mb.nz,
                                      kl_weight=kl_w, bf16=bf16_products(autocast))
    else:
        with autocast:
            out = model(mb.x, mb.batch, mb.log_library, mb.cov, mb.nz)
        opt.zero_grad(set_to_none=True)
        out.loss(kl_w).backward()
    opt.step()
    return out


def _history_row(epoch: int, tr: dict, va: dict | None, kl_w: float, seconds: float) -> dict:
    """Return the history columns of one epoch from the training (``tr``) and validation (``va``) metrics."""
    row = {"epoch": epoch, "kl_weight": kl_w, "seconds": seconds}
    for name in ("elbo", "reconstruction", "kl"):
        row[f"{name}_train"] = tr[name]
        row[f"{name}_validation"] = va[name] if va else np.nan
    return row


class _BestEpoch:
    """The weights of the best epoch so far and the epochs since it (early stopping).

    Until the KL warm-up is over (``warmup_epochs``) the bound is still being reshaped, so
    the latest weights count as the best.
    """

    def __init__(self, warmup_epochs: int):
        self.warmup_epochs = warmup_epochs
        self.score, self.state, self.epoch, self.bad_epochs = -math.inf, None, -1, 0

    def update(self, epoch: int, score: float, module: VAE) -> bool:
        """Keep ``module``'s weights if ``epoch`` is the new best; return whether it is."""
        if score > self.score or self.state is None or epoch < self.warmup_epochs:
            self.score, self.state, self.epoch, self.bad_epochs = score, copy.deepcopy(module.state_dict()), epoch, 0
            return True
        self.bad_epochs += 1
        return False


def _keep_partial(res: TrainResult, best: _BestEpoch) -> None:
    """After Ctrl-C: keep the complete epochs and the best weights, or raise when there are none."""
    res.interrupted = True
    h = res.history
    n_ep = min(len(v) for v in h.values())
    if best.state is None:
        raise TrainingInterrupted(
            "Training interrupted before the first epoch finished; there is no model to keep "
            "and nothing was written."
        ) from None
    for k in h:  # drop a half-recorded epoch
        del h[k][n_ep:]
    warnings.warn(
        f"Training interrupted after {n_ep} epoch(s); keeping the best weights so far "
        f"(epoch {best.epoch}) and the partial history.",
        stacklevel=5,  # the caller of tl.vae / tl.vae_map
    )
