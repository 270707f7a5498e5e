"""Where one training step goes now: CPU ms per step, eager vs compiled likelihood, and an op profile.

    python benchmarks/profile_step.py --threads 1
    python benchmarks/profile_step.py --threads 2 --n-cells 20000

Builds what ``tl.vae`` builds (VAE with its defaults, CSR minibatches of ``--batch-size``
cells, default 128 as in the tables so far; fused Adam), runs whole epochs of the training
step (forward, backward, Adam) and reports CPU and wall ms per step for the eager and the
compiled likelihood, then ``torch.profiler``'s self CPU time per op family for the compiled
step. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

FAMILIES = [  # (family, substrings of op names), first match wins
    ("matmul (encoder/decoder Linear, fwd+bwd)", ("mm", "addmm", "linear")),
    ("compiled likelihood kernels (fwd+bwd)", ("CompiledFxGraph", "CompiledFunction", "Torch-Compiled")),
    ("gamma table + log(x!) (non-zeros)", ("_NBGammaSum", "index_add", "index_select", "cumsum", "nonzero")),
    ("Adam", ("adam", "Optimizer", "zero_grad")),
    ("log_softmax", ("log_softmax",)),
    ("batch norm", ("batch_norm",)),
    ("copies / data", ("copy_", "to", "from_numpy", "empty", "zeros")),
]


def build(n_cells, n_genes, seed=0, batch_size=128):
    import sc_vi_ext as sv
    from sc_vi_ext.dataloader import Minibatches
    from sc_vi_ext.inputs import check_counts, get_counts
    from sc_vi_ext.module import VAE

    adata = sv.datasets.simulate(n_cells, n_genes, n_batches=3, n_types=8, random_state=0)
    X = get_counts(adata, None)
    totals = check_counts(X, "X")
    torch.manual_seed(seed)
    module = VAE(n_genes)
    loader = Minibatches(X, np.arange(n_cells), log_library=np.log(totals).astype(np.float32), batch_size=batch_size,
                         with_nz=True, shuffle=True, rng=np.random.default_rng(seed))
    return module, loader


def epoch(module, loader, opt, autocast=None):
    autocast = autocast or contextlib.nullcontext()
    for mb in loader:
        with autocast:  # as train.py's steps: only the forward pass
            out = module(mb.x, mb.batch, mb.log_library, mb.cov, mb.nz)
        opt.zero_grad(set_to_none=True)
        out.loss(1.0).backward()
        opt.step()


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k.lower() in name.lower() for k in keys):
            return fam
    return "other element-wise and autograd"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", type=int, default=6400)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="as tl.vae(precision=): bfloat16 autocast of the forward pass")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from sc_vi_ext.module import fused

    print(f"# uptime: {os.popen('uptime').read().strip()}; torch threads {torch.get_num_threads()}")
    from sc_vi_ext.acceleration import matmul_precision

    module, loader = build(args.n_cells, args.n_genes, batch_size=args.batch_size)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, fused=True)
    ac = matmul_precision(args.precision, "cpu")
    print(f"# batch {args.batch_size}, precision {args.precision}")
    rows = {}
    for mode in ("eager", "compiled"):
        fused.set_compiled(mode == "compiled")
        t0 = time.perf_counter()
        epoch(module, loader, opt, ac)  # warm-up (and compilation)
        first = time.perf_counter() - t0
        best_cpu = best_wall = float("inf")
        for _ in range(args.epochs):
            c, w = time.process_time(), time.perf_counter()
            epoch(module, loader, opt, ac)
            best_cpu = min(best_cpu, (time.process_time() - c) / len(loader) * 1e3)
            best_wall = min(best_wall, (time.perf_counter() - w) / len(loader) * 1e3)
        rows[mode] = (best_wall, best_cpu, first)
    print("| likelihood | wall ms/step | CPU ms/step | wall ms per 128 cells | first epoch s (incl. compile) |")
    print("|---|---|---|---|---|")
    for mode, (w, c, f) in rows.items():
        print(f"| {mode} | {w:.2f} | {c:.2f} | {w * 128 / args.batch_size:.2f} | {f:.1f} |")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        epoch(module, loader, opt, ac)
    fam = collections.Counter()
    for e in prof.key_averages():
        fam[family(e.key)] += e.self_cpu_time_total
    total = sum(fam.values())
    print("\n| op family (compiled step, torch.profiler self CPU) | share |")
    print("|---|---|")
    for k, v in fam.most_common():
        print(f"| {k} | {100 * v / total:.1f} % |")
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
