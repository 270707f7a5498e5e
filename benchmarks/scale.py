"""Scale: ``tl.vae``'s default run from 10^4 to 10^6 cells, in memory and backed (and two processes).

    python -m benchmarks scale                        # 10^4, 10^5, 10^6 (the 10^6 rows take a while)
    python -m benchmarks scale --quick                # 2,000 cells, 2 epochs

Data: ``sv.datasets.simulate`` (2,000 genes, 3 batches, 8 types, ~37 % non-zero; a real
simulation, not stacked copies), written once per size to ``--data-dir`` as h5ad block by block
(10^6 cells' counts are never all in memory while writing) and reused; a file is reused only
once complete (written under a temporary name, then renamed). Rows: each size in each of
``--modes`` (``memory``: read into memory; ``backed``: ``backed="r"``), plus ``ddp2`` (two
processes under ``torchrun``, gloo on CPU) at ``--ddp-sizes``. Each row is its own process (its
peak RSS is its own; for ``ddp2`` rank 0's and the sum) and records ``uptime`` before and after.
``--after`` also times what runs on the trained model: the latent of every cell, log_likelihood
on 1,000 cells, amortization_gap on 100 cells, normalized_expression on 50 genes.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from sc_vi_ext.train import default_max_epochs

from ._common import ROOT, ours_first, parser, peak_rss_mib, save, table, uptime


def make_data(n_cells: int, n_genes: int, data_dir: Path, block_rows: int = 20_000) -> Path:
    """``simulate(n_cells, n_genes, n_batches=3, n_types=8, random_state=0)`` as h5ad (the same
    counts with the default ``block_rows``), written block by block; an existing complete file
    is reused."""
    path = data_dir / f"sim_{n_cells}x{n_genes}.h5ad"
    if path.exists():
        return path
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    from sc_vi_ext.datasets._simulate import simulate_blocks

    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.h5ad")
    obs, var, blocks = simulate_blocks(n_cells, n_genes, n_batches=3, n_types=8, random_state=0,
                                       block_rows=block_rows)
    first = next(blocks)
    ad.AnnData(X=first, obs=obs.iloc[:first.shape[0]], var=var).write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
        X = sparse_dataset(f["X"])
        for block in blocks:
            X.append(block)
        del f["obs"]
        write_elem(f, "obs", obs)
        write_elem(f, "uns", {"simulation": {"n_batches": 3, "n_types": 8, "random_state": 0}})
    tmp.rename(path)
    return path


def csr_gib(path: Path) -> float:
    """Size of the counts as an in-memory CSR (float32 data, int32 indices, int64 indptr)."""
    import h5py

    with h5py.File(path, "r") as f:
        nnz, n = f["X"]["data"].shape[0], f["X"]["indptr"].shape[0]
    return (nnz * 8 + n * 8) / 2**30


def rss_gib() -> float:
    return peak_rss_mib() / 1024


def worker(mode: str, data: str, epochs: str, batch_size: int, threads: int, after: bool,
           compile_: str = "auto") -> None:
    ours_first()
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import torch

    import sc_vi_ext as sv
    from sc_vi_ext.distributed import init_from_env, rank_and_world

    sc.settings.verbosity = 0
    if threads:
        torch.set_num_threads(threads)
    init_from_env()
    rank, world = rank_and_world()
    t0 = time.perf_counter()
    adata = ad.read_h5ad(data, backed="r" if mode == "backed" else None)
    t_load = time.perf_counter() - t0
    run = {} if epochs == "default" else {"max_epochs": int(epochs), "early_stopping": False}
    t0 = time.perf_counter()
    compile_arg = {"auto": "auto", "true": True, "false": False}[compile_]
    run.update({"batch_size": batch_size} if batch_size else {})
    sv.tl.vae(adata, progress=False, n_threads=threads or None, compile=compile_arg, **run)
    t_vae = time.perf_counter() - t0
    uns = adata.uns["vae"]
    h = uns["history"]
    out = {
        "rank": rank, "world": world, "load_s": t_load, "vae_s": t_vae,
        "epochs": len(h["epoch"]), "max_epochs": int(uns["params"]["max_epochs"]),
        "stopped_early": bool(uns["stopped_early"]), "best_epoch": int(uns["best_epoch"]),
        "train_s": float(np.sum(h["seconds"])), "epoch_s": float(np.mean(h["seconds"])),
        "elbo_validation": float(h["elbo_validation"][uns["best_epoch"] - 1]),
        "maxrss_train_gib": rss_gib(),
    }
    if after and rank == 0:
        from sc_vi_ext.model_store import get_model, stored_loader
        from sc_vi_ext.tl._utils import latent_means

        rng = np.random.default_rng(0)
        t = {}
        t0 = time.perf_counter()
        latent_means(get_model(adata), stored_loader(adata, "vae", batch_size=1024))
        t["latent_fill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cells = np.sort(rng.choice(adata.n_obs, min(1000, adata.n_obs), replace=False))
        sv.tl.log_likelihood(adata, subset=cells, n_samples=100, progress=False)
        t["log_likelihood_1000_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sv.tl.amortization_gap(adata, n_cells=100, max_steps=100, progress=False)  # streaming, not gap quality
        t["amortization_gap_100_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sv.tl.normalized_expression(adata, gene_subset=list(adata.var_names[:50]), progress=False)
        t["normalized_expression_50_genes_s"] = time.perf_counter() - t0
        out.update(t, maxrss_after_gib=rss_gib())
    out["maxrss_gib"] = rss_gib()
    print("RESULT " + json.dumps(out), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(mode: str, path: Path, a) -> dict:
    args = ["-m", "benchmarks.scale", "--_worker", mode, "--_data", str(path), "--epochs", str(a.epochs),
            "--batch-size", str(a.batch_size), "--threads", str(a.threads), "--compile", a.compile,
            *(["--after"] if a.after else [])]
    if mode == "ddp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    threads = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}
    env = {**os.environ, **threads, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    row = {"mode": mode, "command": shlex.join([*(f"{k}={v}" for k, v in threads.items()), *cmd]),
           "uptime_before": uptime()}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    row["wall_s"] = time.perf_counter() - t0
    row["uptime_after"] = uptime()
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not results:
        return {**row, "error": proc.stderr[-2000:]}
    r0 = min(results, key=lambda r: r["rank"])
    return {**row, **r0, "maxrss_sum_gib": sum(r["maxrss_gib"] for r in results)}


def scale_table(rows: list[dict]) -> dict:
    out = []
    for r in rows:
        head = [f"{r['n_cells']:,}", r["mode"]]
        if "error" in r:
            out.append(head + ["error"] + [""] * 8)
            continue
        load = lambda u: u.split("load average:")[-1].strip()  # noqa: E731
        budget = default_max_epochs(r["n_cells"])
        # the default run: measured, or (with --epochs N) the fixed costs + its epoch budget at the measured rate
        default_s = r["vae_s"] if r["epochs_arg"] == "default" else r["vae_s"] - r["train_s"] + budget * r["epoch_s"]
        out.append(head + [f"{r['epoch_s']:.1f}", f"{r['epochs']} ({r['max_epochs']}, "
                           f"{'yes' if r['stopped_early'] else 'no'})", f"{r['train_s']:.0f}", f"{r['vae_s']:.0f}",
                           f"{(r['load_s'] + default_s) / 60:.1f}" + ("" if r["epochs_arg"] == "default" else
                                                                      f" ({budget} epochs, extrapolated)"),
                           f"{r['maxrss_gib']:.2f} ({r['maxrss_sum_gib']:.2f})",
                           f"{r['csr_gib']:.2f}", f"{load(r['uptime_before'])} → {load(r['uptime_after'])}"])
    return table("tl.vae by size", ["cells", "mode", "s / epoch", "epochs (max, early stop)", "train s",
                                    "tl.vae s", "read + default tl.vae run, min", "peak RSS GiB (all ranks)",
                                    "counts as CSR GiB", "load before → after"], out,
                 ["s / epoch includes the validation pass. With --epochs N the default run's time is the "
                  "fixed costs of the call + its epoch budget × the measured s / epoch (early stopping can only "
                  "shorten it)."])


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--ddp-sizes", type=int, nargs="*", default=[100_000],
                   help="sizes (among --sizes or not) that also get a 2-process row")
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--epochs", default="default",
                   help="'default': tl.vae's default run (epoch budget, early stopping); N: N epochs, no early stop")
    p.add_argument("--batch-size", type=int, default=0,
                   help="minibatch size; 0: tl.vae's default (the round-2 tables ran at 128, the default then)")
    p.add_argument("--modes", nargs="+", default=["memory", "backed"], choices=["memory", "backed"])
    p.add_argument("--after", action="store_true", help="also time the tools that apply the trained model")
    p.add_argument("--data-dir", default="benchmarks/out/data")
    p.add_argument("--out", default="benchmarks/out/scale.jsonl", help="JSON lines, one per row (appended)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (0: tl.vae's load-aware default; torchrun gives each rank 1)")
    p.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                   help="tl.vae's compile= (the fused likelihood); auto compiles runs of >= 4,000 steps")
    a = p.parse_known_args(argv)[0]
    if a._worker:
        worker(a._worker, a._data, a.epochs, a.batch_size, a.threads, a.after, a.compile)
        return
    if a.epochs != "default":
        int(a.epochs)
    if a.quick:
        a.sizes, a.ddp_sizes, a.epochs, a.modes = [2000], [], "2", ["memory", "backed"]
    started = uptime()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sorted(set(a.sizes) | set(a.ddp_sizes)):
        t0 = time.perf_counter()
        path = make_data(n, a.n_genes, Path(a.data_dir))
        gib = csr_gib(path)
        print(f"data {n:,} x {a.n_genes}: {path} (CSR {gib:.2f} GiB, ready in {time.perf_counter() - t0:.0f} s)",
              flush=True)
        modes = [m for m in a.modes if n in a.sizes] + (["ddp2"] if n in a.ddp_sizes else [])
        for mode in modes:
            r = {"n_cells": n, "n_genes": a.n_genes, "csr_gib": gib, "epochs_arg": a.epochs, **run_row(mode, path, a)}
            rows.append(r)
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"  {mode}: " + json.dumps({k: v for k, v in r.items() if k != "command"}), flush=True)
    save("scale", argv=argv if argv is not None else sys.argv[2:], quick=a.quick, tables=[scale_table(rows)],
         started=started, data=f"simulate(n, {a.n_genes}, n_batches=3, n_types=8)", raw={"rows": rows})


if __name__ == "__main__":
    main()
