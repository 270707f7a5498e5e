"""What makes training fast, and when to use it: the compiled likelihood and bfloat16 matrix products.

Neither changes what is computed: the compiled likelihood equals the eager one to float32
rounding, and bfloat16 applies to the training steps' matrix products only (weights,
likelihood, optimiser and validation stay float32). Threads are in :mod:`sc_vi_ext.threads`.
"""

from __future__ import annotations

import time
import warnings
from typing import Literal, get_args

import torch
from scanpy import logging as logg

from .dataloader import Minibatches
from .module import VAE, fused

# Measured on a 128 x 2,000 ZINB minibatch (1 thread): the compiled dense terms save about
# 3 ms per step; compiling costs 5-20 s (less once inductor's on-disk cache is warm).
COMPILE_MIN_STEPS = 4000


def use_compiled(setting: bool | str, n_steps: int) -> bool:  # noqa: FBT001 - True/False/"auto", passed positionally
    """Whether to train with the compiled likelihood.

    ``setting`` True/False, or "auto" (at least ``COMPILE_MIN_STEPS`` optimiser steps in the budget
    and a compiler here).
    """
    if setting not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', not {setting!r}.")
    if setting == "auto":
        setting = n_steps >= COMPILE_MIN_STEPS
    if setting and not fused.can_compile():
        # stacklevel: use_compiled <- train <- _fit <- tl.vae <- the user's call
        warnings.warn("torch.compile is not available here (no C++ compiler?); training in eager mode.",
                      stacklevel=5)
        return False
    return bool(setting)


Precision = Literal["float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> None:
    """Raise a clear error for a ``precision`` that is not one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}.")


def matmul_precision(precision: str, device: str) -> torch.autocast:
    """Return the autocast context of a training step: bfloat16 matrix products, or disabled."""
    check_precision(precision)
    dev_type = torch.device(device).type
    if precision == "bfloat16" and dev_type == "cpu" and not bf16_fast_on_cpu():
        logg.warning("precision='bfloat16': this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX); "
                     "the matrix products are emulated and slower than float32.")
    return torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def bf16_fast_on_cpu() -> bool:
    """Whether oneDNN runs bfloat16 matrix products natively here (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def warm_up_compiled(module: VAE, loader: Minibatches, autocast: torch.autocast) -> None:
    """Compile the likelihood on a first minibatch (forward and backward), outside the timed epochs."""
    t0 = time.perf_counter()
    # the warm-up must leave no trace: not in the random streams, not in BatchNorm's statistics
    rng_state = None if loader.rng is None else loader.rng.bit_generator.state
    mb = next(iter(loader))
    if rng_state is not None:
        loader.rng.bit_generator.state = rng_state
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    dev = torch.device(loader.device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        with autocast:  # as in the training steps, so that the compiled graph is the one they use
            out = module.loss(mb.x, mb.batch, mb.log_library, cov=mb.cov, nz=mb.nz)
        out.loss(1.0).backward()
    module.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in module.named_buffers():
            v.copy_(buffers[k])
    if fused.compiled_enabled():  # else the compiler failed (logged): eager from here on
        logg.info(f"    compiled the likelihood in {time.perf_counter() - t0:.1f} s")
