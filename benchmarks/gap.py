"""The amortization-gap diagnostics: their time and the accuracy of their log p(x).

    python -m benchmarks gap
    python -m benchmarks gap --quick

On each data set (PBMC, 700 × 765; a 3-batch simulation, ``--n-cells`` × 2,000 genes) a model
is trained with ``tl.vae``'s defaults, then each diagnostic runs at its defaults on every cell
(``tl.amortization_gap(n_cells=None)``, ``tl.trust_score``, ``tl.refine``,
``tl.log_likelihood``): wall and CPU seconds, and seconds per 1,000 cells. Accuracy: every
estimate of log p(x) is a stochastic lower bound, so the tool's per-cell log p(x) is compared
with a reference from 6,000 importance draws (2,000 each from q*, q* widened 1.5× and 2.5×)
on ``--ref-cells`` training and as many held-out cells: the mean shortfall (bias, nats) and
its spread over cells, and the share of cells whose L[q] <= L[q*] <= log p(x) ordering holds.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from ._common import parser, quiet, save, table, uptime

TOOLS = ("amortization_gap", "trust_score", "refine", "log_likelihood")


def reference_log_px(adata, idx: np.ndarray) -> np.ndarray:
    """log p(x) of cells ``idx`` from 6,000 draws of a widened-q* mixture (a tight reference)."""
    import torch

    import sc_vi_ext as sv
    from sc_vi_ext.diagnostics import optimize_q
    from sc_vi_ext.diagnostics.bounds import mixture_iwae
    from sc_vi_ext.model_store import stored_loader

    module = sv.get_model(adata).eval()
    gen = torch.Generator().manual_seed(1)
    out = []
    for mb in stored_loader(adata, "vae", idx, batch_size=64):
        with torch.no_grad():
            q = module.inference(mb.x, mb.batch, mb.cov)
        qs = optimize_q(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, generator=gen, init=q)
        comps = [(qs.mean, qs.log_var + 2 * math.log(w), 2000, i + 1) for i, w in enumerate((1.0, 1.5, 2.5))]
        with torch.no_grad():
            out.append(mixture_iwae(module, mb.x, mb.batch, mb.log_library, comps, generator=gen, cov=mb.cov)[0])
    return torch.cat(out).numpy().astype(np.float64)


def run(name: str, adata, batch_key, ref_cells: int) -> tuple[list, list]:
    import sc_vi_ext as sv
    from sc_vi_ext.model_store import held_out_mask

    sv.tl.vae(adata, batch_key=batch_key, progress=False)
    calls = {
        "amortization_gap": lambda: sv.tl.amortization_gap(adata, n_cells=None, progress=False),
        "trust_score": lambda: sv.tl.trust_score(adata, progress=False),
        "refine": lambda: sv.tl.refine(adata, progress=False),
        "log_likelihood": lambda: sv.tl.log_likelihood(adata, key="vae", progress=False),
    }
    rows = []
    for tool in TOOLS:
        log_px = adata.obs["vae_log_px"].copy() if tool == "log_likelihood" else None  # the gap's, kept
        c, w = time.process_time(), time.perf_counter()
        calls[tool]()
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        rows.append([name, f"tl.{tool}", f"{adata.n_obs:,}", f"{wall:.1f}", f"{cpu:.1f}",
                     f"{wall / adata.n_obs * 1000:.1f}"])
        if log_px is not None:
            adata.obs["vae_log_px_iwae"] = adata.obs["vae_log_px"]
            adata.obs["vae_log_px"] = log_px
    held = held_out_mask(adata, "vae")
    rng = np.random.default_rng(0)
    acc = []
    for split, mask in (("training", ~held), ("held-out", held)):
        idx = np.sort(rng.choice(np.flatnonzero(mask), min(ref_cells, int(mask.sum())), replace=False))
        ref = reference_log_px(adata, idx)
        obs = adata.obs.iloc[idx]
        bias = obs["vae_log_px"].to_numpy() - ref
        order = (obs["vae_elbo"] <= obs["vae_elbo_opt"] + 1e-3) & (obs["vae_elbo_opt"] <= ref + 1e-3)
        acc.append([name, split, f"{len(idx)}", f"{bias.mean():+.3f}", f"{bias.std():.3f}",
                    f"{obs['vae_amortization_gap'].mean():.2f}", f"{obs['vae_approximation_gap'].mean():.2f}",
                    f"{order.mean():.0%}"])
    return rows, acc


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--n-cells", type=int, default=2000)
    p.add_argument("--ref-cells", type=int, default=64, help="cells per split for the accuracy reference")
    args = p.parse_known_args(argv)[0]
    started = uptime()
    quiet()
    import sc_vi_ext as sv

    n, g, ref = (300, 200, 8) if args.quick else (args.n_cells, 2000, args.ref_cells)
    pb = sv.datasets.pbmc68k()
    if args.quick:
        pb = pb[:300].copy()
    sim = sv.datasets.simulate(n, g, n_batches=3, n_types=8, random_state=0)
    times, accs = [], []
    for name, adata, bkey in (("PBMC", pb, None), ("simulation", sim, "batch")):
        t, a = run(name, adata, bkey, ref)
        times += t
        accs += a
    tables = [table("Time of each diagnostic at its defaults, every cell",
                    ["data", "tool", "cells", "wall s", "CPU s", "wall s per 1,000 cells"], times),
              table("Accuracy of tl.amortization_gap's log p(x) against a 6,000-draw reference",
                    ["data", "split", "cells", "bias (nats)", "spread over cells", "mean amortization gap",
                     "mean approximation gap", "L[q] <= L[q*] <= reference"], accs,
                    ["A negative bias is the estimate's shortfall below the reference (both are lower bounds)."])]
    save("gap", argv=argv if argv is not None else sys.argv[2:], quick=args.quick, tables=tables, started=started,
         data=f"sv.datasets.pbmc68k() ({pb.n_obs} × {pb.n_vars}); simulate({n}, {g}, n_batches=3, n_types=8)")


if __name__ == "__main__":
    main()
