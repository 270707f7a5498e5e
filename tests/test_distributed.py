"""Data-parallel training: 2 processes with gloo on loopback vs one process, same global batch."""

from __future__ import annotations

import socket
import subprocess
import sys

import anndata as ad
import numpy as np

import sc_vi_ext as sv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(tmp_path):
    adata = sv.datasets.simulate(300, 40, n_batches=2, n_types=3, random_state=0)
    adata.write_h5ad(tmp_path / "in.h5ad")
    args = ["train", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--max-epochs", "15",
            "--batch-key", "batch", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "sc_vi_ext", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained on 2 processes" in proc.stdout
    ddp = ad.read_h5ad(tmp_path / "out.h5ad")
    single = adata.copy()
    sv.tl.vae(single, batch_key="batch", max_epochs=15, progress=False)
    h2, h1 = ddp.uns["vae"]["history"], single.uns["vae"]["history"]
    assert ddp.uns["vae"]["params"]["world_size"] == 2
    assert len(h2["epoch"]) == len(h1["epoch"]) == 15
    # same global batch and seed: the runs differ only by per-rank BatchNorm statistics
    np.testing.assert_allclose(h2["elbo_validation"][-1], h1["elbo_validation"][-1], rtol=0.01)
    np.testing.assert_array_equal(ddp.uns["vae"]["validation_obs_names"], single.uns["vae"]["validation_obs_names"])
    assert h2["elbo_validation"][-1] > h2["elbo_validation"][0] + 10
    assert ddp.obsm["X_vae"].shape == (300, 10)
