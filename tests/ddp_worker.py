"""Helper of tests/test_distributed.py (not a test): train and dump what each rank holds.

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_worker.py IN.h5ad OUT_DIR '{"run": {...}}'
    python tests/ddp_worker.py IN.h5ad OUT_DIR '{"run": {...}}'        # the single-process reference

For each named configuration (keyword arguments of ``sv.tl.vae``, plus the options below),
each rank writes ``OUT_DIR/{name}_world{W}_rank{R}.npz``: the weights after epoch
``snap_epoch`` (``snap/...``), the final weights (``final/...``), the history, the
stopping bookkeeping and the latent means.

Options: ``snap_epoch`` (default 1); ``zero_noise``: the reparameterisation noise is zero
during training; ``freeze_batchnorm``: BatchNorm layers use their (initial) running
statistics. With both and ``dropout=0`` training is deterministic, and a 2-rank run follows
a single process to rounding error (per-rank BatchNorm batch statistics are the only other
difference between the two).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import sc_vi_ext as sv
import sc_vi_ext.tl._vae as tl_vae
from sc_vi_ext.distributed import init_from_env, rank_and_world
from sc_vi_ext.model_store import state_to_numpy


def run(adata, out: Path, kw: dict) -> None:
    snap_epoch = kw.pop("snap_epoch", 1)
    zero_noise = kw.pop("zero_noise", False)
    freeze_batchnorm = kw.pop("freeze_batchnorm", False)
    snap, noise_calls, randn, train = {}, [], torch.randn, tl_vae.train

    def zeros(size, *, generator=None, device=None, dtype=None):
        noise_calls.append(1)
        return torch.zeros(size, device=device, dtype=dtype)

    def train_with_snapshot(*args, **kwargs):
        def callback(epoch, module):
            if epoch == snap_epoch:
                snap.update(state_to_numpy(module))

        kwargs.update(callback=callback, freeze_batchnorm=freeze_batchnorm)
        if zero_noise:  # z = mean of q(z | x) in training: no Monte Carlo noise between runs
            torch.randn = zeros
        try:
            return train(*args, **kwargs)
        finally:
            torch.randn = randn

    tl_vae.train = train_with_snapshot
    try:
        sv.tl.vae(adata, progress=False, **kw)
    finally:
        tl_vae.train = train
    if zero_noise and not noise_calls:
        raise RuntimeError("zero_noise: the VAE no longer draws its noise with torch.randn; update this helper")
    uns = adata.uns["vae"]
    arrays = {f"snap/{k}": v for k, v in snap.items()}
    arrays.update({f"final/{k}": np.asarray(v) for k, v in uns["model"].items()})
    arrays.update({f"history/{k}": np.asarray(v) for k, v in uns["history"].items()})
    arrays.update(best_epoch=uns["best_epoch"], stopped_early=uns["stopped_early"], interrupted=uns["interrupted"],
                  latent=adata.obsm["X_vae"])
    np.savez(out, **arrays)


def main(inp: str, out_dir: str, configs: str) -> None:
    torch.set_num_threads(1)
    init_from_env()
    rank, world = rank_and_world()
    adata = ad.read_h5ad(inp)
    for name, kw in json.loads(configs).items():
        run(adata.copy(), Path(out_dir) / f"{name}_world{world}_rank{rank}.npz", kw)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
