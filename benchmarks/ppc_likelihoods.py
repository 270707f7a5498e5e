"""Posterior predictive check of "nb" against "zinb" (and "poisson") on the bundled PBMC data.

    python benchmarks/ppc_likelihoods.py

Trains one model per likelihood with the package defaults, then prints, per statistic,
the mean |log(predicted / observed)| over genes and the fraction of genes whose observed
value lies more than 3 posterior-predictive s.d. away, plus the held-out ELBO and IWAE.
"""

from __future__ import annotations

import numpy as np
import scanpy as sc

import sc_vi_ext as sv

sc.settings.verbosity = 0
rows = []
for lik in ("zinb", "nb", "poisson"):
    adata = sv.datasets.pbmc68k()
    sv.tl.vae(adata, likelihood=lik, progress=False)
    sv.tl.posterior_predictive(adata, n_samples=20, progress=False)
    val = adata.uns["vae"]["validation_obs_names"]
    sv.tl.log_likelihood(adata, n_samples=200, subset=val, progress=False)
    best = adata.uns["vae"]["best_epoch"] - 1
    s = adata.uns["vae"]["posterior_predictive"]["summary"]
    rows.append((lik, adata.uns["vae"]["history"]["elbo_validation"][best],
                 float(np.nanmean(adata.obs["vae_log_px"])), s))
stats = list(rows[0][3])
print("| likelihood | held-out ELBO | held-out IWAE (K=200) | "
      + " | ".join(f"{k}: mean abs log ratio / frac > 3 sd" for k in stats) + " |")
print("|---" * (3 + len(stats)) + "|")
for lik, elbo, lpx, s in rows:
    cells = " | ".join(f"{s[k]['mean_abs_log_ratio']:.3f} / {s[k]['frac_outside_3sd']:.2f}" for k in stats)
    print(f"| {lik} | {elbo:.1f} | {lpx:.1f} | {cells} |")
