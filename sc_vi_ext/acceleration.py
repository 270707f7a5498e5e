"""What makes training and the diagnostics fast: compiled likelihood, bfloat16, allocator settings.

None changes what is computed: the compiled likelihood equals the eager one to float32
rounding, bfloat16 applies to the training steps' matrix products only (weights,
likelihood, optimiser and validation stay float32), and the allocator only decides where
freed memory goes. Threads are in :mod:`sc_vi_ext.threads`.
"""

from __future__ import annotations

import ctypes
import os
import sys
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


def use_compiled(setting: bool | str, n_steps: int, *, kernel: bool = False) -> bool:  # noqa: FBT001 - True/False/"auto"
    """Whether to train with the compiled likelihood.

    ``setting`` True/False, or "auto": only where the fused kernel does not apply (``kernel``
    False: a per-cell dispersion, a GPU), with at least ``COMPILE_MIN_STEPS`` optimiser steps in
    the budget and a compiler here. Where the kernel applies it is faster than the compiled
    dense terms and needs no compile time (``benchmarks/RESULTS.md``); True still compiles
    them (and the kernel stands aside for that training).
    """
    if setting not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', not {setting!r}.")
    if setting == "auto":
        setting = not kernel and n_steps >= COMPILE_MIN_STEPS
    if setting and not fused.can_compile():
        # stacklevel: use_compiled <- train <- _fit <- tl.vae <- the user's call
        warnings.warn("torch.compile is not available here (no C++ compiler?); training in eager mode.",
                      stacklevel=5)
        return False
    return bool(setting)


Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> None:
    """Raise a clear error for a ``precision`` that is not one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}.")


def resolve_precision(precision: str, device: str) -> str:
    """Return the precision a training runs at, ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` is bfloat16 where the hardware multiplies bfloat16 natively (a CPU with AVX-512
    BF16 or AMX, a CUDA GPU with bfloat16 support), else float32: there bfloat16 matrix
    products are 2-5x faster and the models' quality is the same (``benchmarks/RESULTS.md``,
    ``quality``); elsewhere they would be emulated and slower.
    """
    check_precision(precision)
    if precision != "auto":
        return precision
    dev = torch.device(device).type
    native = bf16_fast_on_cpu() if dev == "cpu" else dev == "cuda" and torch.cuda.is_bf16_supported()
    return "bfloat16" if native else "float32"


def matmul_precision(precision: str, device: str) -> torch.autocast:
    """Return the autocast context of a training step: bfloat16 matrix products, or disabled."""
    precision = resolve_precision(precision, device)
    dev_type = torch.device(device).type
    if precision == "bfloat16" and dev_type == "cpu" and not bf16_fast_on_cpu():
        logg.warning("precision='bfloat16': this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX); "
                     "the matrix products are emulated and slower than float32.")
    return torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def bf16_products(autocast: torch.autocast) -> bool:
    """Whether ``autocast`` (from :func:`matmul_precision`) runs the matrix products in bfloat16."""
    return bool(autocast._enabled) and autocast.fast_dtype == torch.bfloat16


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


# glibc's mallopt parameters, and the values set by keep_freed_memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 << 20
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc's allocator keep freed blocks of up to 32 MiB for reuse; return whether it is set.

    Every step allocates the same few-MiB tensors (a minibatch's (samples, cells, genes)
    blocks) and frees them again. By default glibc serves blocks from about 128 KiB up with
    fresh pages from the kernel and returns them on free, or trims the heap when a few MiB are
    free at its top, so each such tensor costs page faults and zeroing: measured, the
    amortization gap ran 1.4x slower on two threads (11.0 against 7.6 s, 1,000 x 2,000) and
    a decoder pass spent half its time there. With ``mallopt`` blocks up to
    ``MMAP_THRESHOLD`` come from the heap and up to ``TRIM_THRESHOLD`` of free heap is kept:
    the process holds on to at most that much memory it has freed.

    Process-wide and once per process; glibc on Linux only. Not done when the environment
    sets ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (the user's own choice) or
    ``SC_VI_EXT_KEEP_ALLOCATOR=1``.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        env = os.environ
        if (sys.platform.startswith("linux") and not env.get("SC_VI_EXT_KEEP_ALLOCATOR")
                and "MALLOC_MMAP_THRESHOLD_" not in env and "MALLOC_TRIM_THRESHOLD_" not in env):
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "gnu_get_libc_version"):  # glibc: musl has no such thresholds
                    _allocator_tuned = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                                        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
            except (OSError, AttributeError):
                pass
    return _allocator_tuned
