"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

Every rank holds the whole (or backed) AnnData and draws the same minibatch order from
the same seed; each global minibatch is split across ranks, and DistributedDataParallel
averages the gradients, so N ranks with local batches of b/N follow the same optimisation
as one process with batches of b (up to BatchNorm statistics, which stay per rank).
Training metrics are summed across ranks. Before each validation pass the buffers
(BatchNorm running statistics) are broadcast from rank 0, each rank evaluates its share of
the held-out cells, and the sums are all-reduced and then broadcast from rank 0: every rank
sees the same bits, so the early-stopping decision and the best epoch are the same on
every rank and no rank can leave the loop while another waits in a collective.

Ctrl-C: ``torchrun`` forwards SIGINT to every worker (each in its own session) and SIGKILLs
those still alive after ``--shutdown-timeout`` seconds (default 30, or the environment
variable ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``); a scheduler's SIGTERM (SLURM, Kubernetes, at
the end of a time limit) is forwarded the same way and treated as Ctrl-C. While a
multi-process training runs, SIGINT and SIGTERM only set a flag; every
``INTERRUPT_POLL_STEPS`` optimiser steps (and at the start of each epoch) the ranks
all-reduce their flags, and once any rank has one they all stop at the same step, as a
single process does on Ctrl-C: best weights so far, partial history, ``interrupted=True``.
The ``sc-vi-ext train`` command keeps both signals deferred until the result is written,
so rank 0 writes and the other ranks exit (status 0); in a single process it makes SIGTERM
stop training as Ctrl-C does (:func:`sigterm_as_ctrl_c`).
Only rank 0 writes results.

A worker that dies (out-of-memory killer, a Python error on one rank, a lost node) leaves the
others in a collective: the process group's timeout (``PROCESS_GROUP_TIMEOUT_S``, or the
environment variable ``SC_VI_EXT_DIST_TIMEOUT`` in seconds) bounds that wait, instead of
torch's 30 minutes; on loopback gloo notices a closed connection at once. ``sc-vi-ext train``
then ends with one line and status 1, and ``torchrun``'s summary names the rank that died.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


PROCESS_GROUP_TIMEOUT_S = 60.0  # the longest a rank waits in a collective for the others
TIMEOUT_ENV = "SC_VI_EXT_DIST_TIMEOUT"


def group_timeout() -> timedelta:
    """Return the process group's timeout: ``SC_VI_EXT_DIST_TIMEOUT`` seconds, else ``PROCESS_GROUP_TIMEOUT_S``."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else PROCESS_GROUP_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, not {value!r}.") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, not {value!r}.")
    return timedelta(seconds=seconds)


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL when CUDA is available, else gloo. Returns True when distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=group_timeout())
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def device_for_rank(device: str) -> str:
    """On a multi-GPU run, each rank uses the GPU of its LOCAL_RANK."""
    if device == "cuda" and rank_and_world()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` when distributed, else ``module``."""
    if rank_and_world()[1] <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, identical in every bit on every rank (rank 0's result is broadcast).

    Decisions taken from it (early stopping, the best epoch) therefore agree everywhere.
    """
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        dist.broadcast(t, src=0)
    return t


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DistributedDataParallel broadcasts them before each forward pass, but the last training
    step then updates them from each rank's own cells, so they differ slightly afterwards.
    """
    if rank_and_world()[1] <= 1:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


# --- Ctrl-C and SIGTERM --------------------------------------------------------------------

INTERRUPT_POLL_STEPS = 16  # optimiser steps between the all-reduces of the interrupt flags
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # both stop training and keep the best epoch so far
_sigint_received = False
_last_signal: int | None = None  # the last stop signal that arrived (SIGINT when it is Python's own Ctrl-C)


def _on_sigint(signum, frame) -> None:
    global _sigint_received, _last_signal
    _sigint_received, _last_signal = True, signum


def _raise_interrupt(signum, frame) -> None:
    """SIGTERM handled as Python handles SIGINT: a KeyboardInterrupt in the main thread."""
    global _last_signal
    _last_signal = signum
    raise KeyboardInterrupt


def last_signal_name() -> str:
    """How the last interrupt arrived, for messages: ``"SIGTERM"`` or ``"Ctrl-C"``."""
    return "SIGTERM" if _last_signal == signal.SIGTERM else "Ctrl-C"


def _install(handler, signals=STOP_SIGNALS) -> Callable[[], None]:
    """Install ``handler`` for ``signals`` (main thread only); return the function that restores the previous ones."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.signal(s, handler) for s in signals}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def defer_sigint(*, always: bool = False) -> Callable[[], None]:
    """In a multi-process run (``WORLD_SIZE`` > 1), make SIGINT and SIGTERM set a flag instead of stopping.

    Returns the function that restores the previous handlers.

    A KeyboardInterrupt on one rank would leave the others blocked in a collective; with the
    flag, :func:`interrupt_requested` lets all ranks stop at the same step. Outside a
    multi-process run (unless ``always``: e.g. while a result is written), or off the main
    thread, nothing changes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not always:
        return lambda: None
    return _install(_on_sigint)


def sigterm_as_ctrl_c() -> Callable[[], None]:
    """In a single process, make SIGTERM raise KeyboardInterrupt as Ctrl-C does; return the restoring function.

    Training then keeps the best epoch so far on a scheduler's SIGTERM as on Ctrl-C. Under
    torchrun (``WORLD_SIZE`` > 1) :func:`defer_sigint` handles both signals; there, and off the
    main thread, nothing changes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return lambda: None
    return _install(_raise_interrupt, (signal.SIGTERM,))


def interrupt_requested(device: str | torch.device = "cpu") -> bool:
    """Whether SIGINT or SIGTERM reached any rank (a collective: every rank must call it at the same point)."""
    if rank_and_world()[1] <= 1:
        return _sigint_received
    flag = torch.tensor([int(_sigint_received)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class Interruptible:
    """Wrap a training loader so that all ranks stop together on an interrupt.

    Every ``every`` minibatches (and before the first), all ranks check :func:`interrupt_requested`
    together and raise KeyboardInterrupt at the same step.
    """

    def __init__(self, loader, every: int = INTERRUPT_POLL_STEPS):
        self.loader, self.every = loader, every

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        for i, mb in enumerate(self.loader):
            if i % self.every == 0 and interrupt_requested(self.loader.device):
                raise KeyboardInterrupt
            yield mb


def interruptible(loader):
    """Return (loader, restore).

    Under a multi-process run, ``loader`` wrapped in :class:`Interruptible`
    with SIGINT and SIGTERM deferred until ``restore()``; else ``loader`` unchanged and a no-op.
    """
    if rank_and_world()[1] <= 1:
        return loader, lambda: None
    restore_handler = defer_sigint()

    def restore() -> None:
        global _sigint_received
        restore_handler()
        _sigint_received = False  # acted upon (or training ended): a later training starts afresh

    return Interruptible(loader), restore
