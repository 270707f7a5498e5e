"""Which proposal estimates log p(x) best for its cost? The IWAE schemes of ``tl.amortization_gap``.

    python benchmarks/gap_proposal.py --model /tmp/bench/sim.h5ad
    python benchmarks/gap_proposal.py --model /tmp/bench/pbmc.h5ad

On ``--n-cells`` training and as many held-out cells of a saved model (``gap_profile.py
--save`` writes one), q* is found with the default optimiser, then log p(x) is estimated
by each scheme ``--repeats`` times with fresh draws and compared with a reference from
6,000 draws (2,000 each from q*, q* widened 1.5x and q* widened 2.5x, one mixture). Every
IWAE estimate is a stochastic lower bound, so a scheme is better the smaller its shortfall
below the reference (its bias, printed with its sign; a positive value means the reference
itself is not converged for those cells) and the smaller its spread between repeats.
Quality only: the timing of the defaults is ``gap_profile.py``'s.
"""

from __future__ import annotations

import argparse
import math
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

# name -> components: (which Gaussian, draws); "q" and "q*" share their noise (one stream), as in decompose
SCHEMES = {
    "round 3 default: q + q*, 250 + 250": [("q", 250), ("q*", 250)],
    "q + q*, 64 + 64": [("q", 64), ("q*", 64)],
    "round 4 default: q + q* + q* x1.5, 32 + 32 + 64": [("q", 32), ("q*", 32), ("w1.5", 64)],
    "q + q* + q* x1.3, 32 + 32 + 64": [("q", 32), ("q*", 32), ("w1.3", 64)],
    "q + q* + q* x2, 32 + 32 + 64": [("q", 32), ("q*", 32), ("w2", 64)],
    "q + q* + q* x1.5, 32 + 32 + 192": [("q", 32), ("q*", 32), ("w1.5", 192)],
    "q* + q* x1.5, 64 + 64": [("q*", 64), ("w1.5", 64)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--n-cells", type=int, default=64, help="cells per split")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import anndata as ad

    import sc_vi_ext as sv
    from sc_vi_ext.diagnostics import optimize_q
    from sc_vi_ext.diagnostics.bounds import mixture_iwae
    from sc_vi_ext.model_store import held_out_mask, stored_loader

    adata = ad.read_h5ad(args.model)
    module = sv.get_model(adata).eval()
    val = held_out_mask(adata, "vae")
    rng = np.random.default_rng(0)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(m), min(args.n_cells, m.sum()), replace=False)
                                  for m in (~val, val)]))
    mb = next(iter(stored_loader(adata, "vae", idx, batch_size=len(idx))))
    held = torch.as_tensor(val[idx])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q = module.inference(mb.x, mb.batch, mb.cov)
    qs = optimize_q(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, generator=gen, init=q)
    gauss = {"q": q, "q*": (qs.mean, qs.log_var)}

    def comp(name, n, stream):
        if name.startswith("w"):
            mean, log_var = gauss["q*"]
            return mean, log_var + 2 * math.log(float(name[1:])), n, stream
        return (*gauss[name], n, 0)

    def estimate(spec):
        comps = [comp(name, n, i + 1) for i, (name, n) in enumerate(spec)]
        return mixture_iwae(module, mb.x, mb.batch, mb.log_library, comps, generator=gen, cov=mb.cov)[0]

    ref = estimate([("q*", 2000), ("w1.5", 2000), ("w2.5", 2000)])
    print(f"# {args.model}: {int((~held).sum())} training and {int(held.sum())} held-out cells; reference from "
          "6,000 draws")
    print("| scheme | draws | training cells: bias, nats (spread) | held-out cells: bias, nats (spread) |")
    print("|---|---|---|---|")
    for name, spec in SCHEMES.items():
        err = torch.stack([estimate(spec) - ref for _ in range(args.repeats)])  # (repeats, cells)
        cols = [f"{err[:, m].mean():+.3f} ({err[:, m].std():.3f})" for m in (~held, held)]
        print(f"| {name} | {sum(n for _, n in spec)} | {cols[0]} | {cols[1]} |", flush=True)


if __name__ == "__main__":
    main()
