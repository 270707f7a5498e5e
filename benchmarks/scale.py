"""Scaling benchmark: seconds/epoch and peak memory at 10^4..10^6 cells; in memory, backed, 1 vs 2 processes.

    python benchmarks/scale.py --sizes 10000 100000 1000000 --epochs 1

Data come from ``sv.datasets.simulate`` (2,000 genes, 3 batches, 8 types, ~37% non-zero),
written once to ``--data-dir`` as uncompressed h5ad and reused. Sizes above 100,000 cells
stack copies of a 100,000-cell simulation (same distribution; simulating 10^6 cells from
scratch costs more time than the benchmark itself). Every configuration runs in its own
process, so the peak resident memory (ru_maxrss) is that configuration's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BASE_CELLS = 100_000


def make_data(n_cells: int, n_genes: int, data_dir: Path) -> Path:
    path = data_dir / f"sim_{n_cells}x{n_genes}.h5ad"
    if path.exists():
        return path
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    import sc_vi_ext as sv

    data_dir.mkdir(parents=True, exist_ok=True)
    base = sv.datasets.simulate(min(n_cells, BASE_CELLS), n_genes, n_batches=3, n_types=8, random_state=0)
    if n_cells > BASE_CELLS:
        reps = -(-n_cells // BASE_CELLS)
        X = sp.vstack([base.X] * reps, format="csr")[:n_cells]
        obs = base.obs.iloc[np.arange(n_cells) % BASE_CELLS].copy()
        obs.index = [f"cell_{i}" for i in range(n_cells)]
        base = ad.AnnData(X=X, obs=obs, var=base.var)
    base.write_h5ad(path)
    return path


def worker(mode: str, data: str, epochs: int, batch_size: int, threads: int) -> None:
    import anndata as ad
    import scanpy as sc

    import sc_vi_ext as sv
    from sc_vi_ext.distributed import init_from_env, rank_and_world

    import torch

    sc.settings.verbosity = 0
    torch.set_num_threads(threads)
    init_from_env()
    rank, world = rank_and_world()
    t0 = time.perf_counter()
    adata = ad.read_h5ad(data, backed="r" if mode == "backed" else None)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    sv.tl.vae(adata, max_epochs=epochs, batch_size=batch_size, early_stopping=False, progress=False)
    t_total = time.perf_counter() - t0
    h = adata.uns["vae"]["history"]
    out = {
        "rank": rank, "world": world, "load_s": t_load, "vae_s": t_total,
        "epoch_s": float(sum(h["seconds"]) / len(h["seconds"])),
        "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "elbo_validation": float(h["elbo_validation"][-1]),
    }
    print("RESULT " + json.dumps(out), flush=True)


def run(mode: str, path: Path, epochs: int, batch_size: int, threads: int) -> dict:
    args = ["--_worker", mode, "--_data", str(path), "--epochs", str(epochs), "--batch-size", str(batch_size),
            "--threads", str(threads)]
    if mode == "ddp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(29500 + os.getpid() % 1000), __file__, *args]
    else:
        cmd = [sys.executable, __file__, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not results:
        return {"error": proc.stderr[-500:]}
    r0 = min(results, key=lambda r: r["rank"])
    return {**r0, "wall_s": wall, "maxrss_gib": sum(r["maxrss_gib"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["memory", "backed", "ddp2"], choices=["memory", "backed", "ddp2"])
    p.add_argument("--data-dir", default="benchmarks/out/data")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: each DDP rank gets 1 as torchrun sets it; "
                        "on a busy 2-core machine 2 threads in one process oversubscribe the cores)")
    p.add_argument("--_worker")
    p.add_argument("--_data")
    a = p.parse_args()
    if a._worker:
        worker(a._worker, a._data, a.epochs, a.batch_size, a.threads)
        return
    import scipy.sparse as sp  # noqa: F401  (fail early if the stack is missing)
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} torch thread(s) per process, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for n in a.sizes:
        t0 = time.perf_counter()
        path = make_data(n, a.n_genes, Path(a.data_dir))
        size_gib = path.stat().st_size / 2**30
        print(f"data {n} x {a.n_genes}: {path} ({size_gib:.2f} GiB on disk, ready in {time.perf_counter() - t0:.0f} s)",
              flush=True)
        for mode in a.modes:
            r = run(mode, path, a.epochs, a.batch_size, a.threads)
            rows.append((n, mode, size_gib, r))
            print(f"  {mode}: {r}", flush=True)
    print("\n| cells | mode | CSR on disk (GiB) | s/epoch | cells/s | peak RSS (GiB, all processes) "
          "| RSS limit 1.5×CSR+2 | load s | val ELBO |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, mode, size, r in rows:
        if "error" in r:
            print(f"| {n:,} | {mode} | {size:.2f} | error | | | | | |")
            continue
        print(f"| {n:,} | {mode} | {size:.2f} | {r['epoch_s']:.1f} | {n / r['epoch_s']:,.0f} | {r['maxrss_gib']:.2f} "
              f"| {1.5 * size + 2:.1f} | {r['load_s']:.1f} | {r['elbo_validation']:.1f} |")


if __name__ == "__main__":
    main()
