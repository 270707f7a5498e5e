"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

Every rank holds the whole (or backed) AnnData and draws the same minibatch order from
the same seed; each global minibatch is split across ranks, and DistributedDataParallel
averages the gradients, so N ranks with local batches of b/N follow the same optimisation
as one process with batches of b (up to BatchNorm statistics, which stay per rank).
Training metrics are summed across ranks; the validation ELBO is computed on every rank
over all held-out cells, so early stopping decides the same everywhere. Only rank 0
writes results.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL when CUDA is available, else gloo. Returns True when distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
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
