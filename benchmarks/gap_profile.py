"""Where ``tl.amortization_gap``'s time goes: the q* optimiser against the IWAE pass.

    OMP_NUM_THREADS=1 python benchmarks/gap_profile.py --n-cells 1000 --n-genes 2000

Trains a model on ``datasets.simulate(n_cells, n_genes, n_batches=2)`` (``--epochs``, 1
thread), then runs ``tl.amortization_gap`` with its defaults on every cell while timing, in
CPU seconds, the two calls that do the work inside ``diagnostics.gaps.decompose``:
``optimize_q`` (q* per cell) and ``iwae`` (log p(x), L[q] and L[q*] from one pass of paired
draws). Run it alone on the machine; it prints the load before and after.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def timed(fn, totals: dict, key: str):
    """``fn`` wrapped so that its CPU seconds add up in ``totals[key]``."""

    def wrapper(*args, **kwargs):
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.process_time() - t0

    return wrapper


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", type=int, default=1000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    import sc_vi_ext as sv
    from sc_vi_ext.diagnostics import gaps

    print(f"# uptime: {os.popen('uptime').read().strip()}")
    adata = sv.datasets.simulate(args.n_cells, args.n_genes, n_batches=2, random_state=0)
    sv.tl.vae(adata, max_epochs=args.epochs, progress=False, n_threads=1)
    totals = {"optimize_q": 0.0, "iwae": 0.0}
    gaps.optimize_q = timed(gaps.optimize_q, totals, "optimize_q")
    gaps.iwae = timed(gaps.iwae, totals, "iwae")
    t0 = time.process_time()
    sv.tl.amortization_gap(adata, n_cells=None, progress=False)
    total = time.process_time() - t0
    res = adata.uns["vae"]["amortization_gap"]["all"]
    print("| cells x genes | total CPU s | q* (optimize_q) | IWAE pass (iwae) | rest |")
    print("|---|---|---|---|---|")
    rest = total - sum(totals.values())
    print(f"| {args.n_cells} x {args.n_genes} | {total:.1f} | {totals['optimize_q']:.1f} | {totals['iwae']:.1f} | "
          f"{rest:.1f} |")
    print(f"# amortization gap {res['amortization_gap_mean']:.2f} ± {res['amortization_gap_se']:.2f}, "
          f"approximation gap {res['approximation_gap_mean']:.2f} ± {res['approximation_gap_se']:.2f} nats/cell")
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
