"""Where ``tl.amortization_gap``'s time goes, and its answers: one row per run, for A/B across commits.

    python benchmarks/gap_profile.py --save /tmp/sim.h5ad                     # train, save, time
    python benchmarks/gap_profile.py --model /tmp/sim.h5ad --threads 1 2      # time a saved model
    PYTHONPATH=/tmp/old python benchmarks/gap_profile.py --model /tmp/sim.h5ad --label old

Without ``--model`` it trains ``tl.vae`` with its defaults on ``datasets.simulate(n_cells,
n_genes, n_batches=2)`` (``--pbmc``: the bundled PBMC subset, layer "counts") and saves the
result with ``--save``; with ``--model`` it loads a saved one, so that several commits (a
``git worktree`` of an older commit put first on PYTHONPATH) time the same weights. Then
``tl.amortization_gap`` runs with its defaults (``--kw``: other settings) on every cell,
``--repeats`` times per thread count, timing in wall seconds the two calls that do the work
inside ``diagnostics.gaps``:
the q* optimiser and the importance-sampling pass (``iwae`` before round 4, ``mixture_iwae``
after). It prints the machine's load before and after: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def timed(fn, totals: dict, key: str):
    """``fn`` wrapped so that its wall seconds add up in ``totals[key]``."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0

    return wrapper


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", type=int, default=1000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--pbmc", action="store_true", help="the bundled PBMC subset instead of a simulation")
    p.add_argument("--model", help="a saved h5ad with a trained model (skips training)")
    p.add_argument("--save", help="where to write the trained h5ad")
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--label", default="this checkout")
    p.add_argument("--kw", default="{}", help="tl.amortization_gap settings as JSON (default: its defaults)")
    args = p.parse_args()
    import anndata as ad

    import sc_vi_ext as sv
    from sc_vi_ext.diagnostics import gaps

    print(f"# uptime: {os.popen('uptime').read().strip()}")
    if args.model:
        adata = ad.read_h5ad(args.model)
    else:
        if args.pbmc:
            adata = sv.datasets.pbmc68k()
            sv.tl.vae(adata, layer="counts", progress=False, n_threads=1)
        else:
            adata = sv.datasets.simulate(args.n_cells, args.n_genes, n_batches=2, random_state=0)
            sv.tl.vae(adata, progress=False, n_threads=1)
        if args.save:
            adata.write_h5ad(args.save)
    totals = {"q": 0.0, "is": 0.0}
    gaps.optimize_q = timed(gaps.optimize_q, totals, "q")
    sampler = "mixture_iwae" if hasattr(gaps, "mixture_iwae") else "iwae"
    setattr(gaps, sampler, timed(getattr(gaps, sampler), totals, "is"))
    print("| code | cells x genes | threads | wall s | q* s | importance sampling s | training cells: amortization gap "
          "| approximation gap | held-out cells: amortization gap | approximation gap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.threads:
        torch.set_num_threads(n)
        for _ in range(args.repeats):
            for k in totals:
                totals[k] = 0.0
            a = adata.copy()
            t0 = time.perf_counter()
            sv.tl.amortization_gap(a, n_cells=None, progress=False, **json.loads(args.kw))
            wall = time.perf_counter() - t0
            res = a.uns["vae"]["amortization_gap"]
            cols = [f"{res[s][g + '_mean']:.3f} ± {res[s][g + '_se']:.3f}" for s in ("train", "validation")
                    for g in ("amortization_gap", "approximation_gap")]
            row = [args.label, f"{a.n_obs} x {a.n_vars}", str(n), f"{wall:.1f}", f"{totals['q']:.1f}",
                   f"{totals['is']:.1f}", *cols]
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
