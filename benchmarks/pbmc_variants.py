"""Quality of training settings on PBMC, over seeds (issue 9, lever 5).

    python benchmarks/pbmc_variants.py --seeds 0 1 2 --configs batch128 batch256 bf16 batch256-bf16

Trains ``sv.tl.vae`` on the bundled PBMC counts with each configuration and seed and reports
held-out IWAE log p(x) (K=100 on the validation cells), kNN accuracy of ``bulk_labels``,
k-means ARI/NMI, and the same kNN accuracy for PCA (10 PCs of log-normalised counts), as mean
± s.d. over seeds. Quality only: wall times are indicative (run it alone for timings).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")

CONFIGS = {
    "batch128": {"batch_size": 128, "lr": 1e-3},  # the defaults before round 3
    "batch256": {"batch_size": 256, "lr": 2e-3},  # the current defaults
    "bf16": {"batch_size": 128, "lr": 1e-3, "precision": "bfloat16"},
    "batch256-bf16": {"batch_size": 256, "lr": 2e-3, "precision": "bfloat16"},
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args()
    import scanpy as sc

    import sc_vi_ext as sv
    from sc_vi_ext.metrics import kmeans_scores, knn_accuracy
    from sc_vi_ext.model_store import held_out_mask

    adata = sv.datasets.pbmc68k()
    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    pca = adata.copy()
    sc.pp.normalize_total(pca, target_sum=1e4)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=10, random_state=0)
    print(f"# uptime: {os.popen('uptime').read().strip()}")
    print(f"# PCA (10 PCs of log-normalised counts): kNN {knn_accuracy(pca.obsm['X_pca'], labels):.3f}, "
          "k-means ARI {:.3f}, NMI {:.3f}".format(*kmeans_scores(pca.obsm["X_pca"], labels)))
    print("| config | epochs | wall s | held-out IWAE | kNN acc | k-means ARI | k-means NMI |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        rows = []
        for seed in args.seeds:
            a = adata.copy()
            t0 = time.perf_counter()
            sv.tl.vae(a, layer="counts", random_state=seed, progress=False, n_threads=args.threads, **CONFIGS[name])
            wall = time.perf_counter() - t0
            mask = held_out_mask(a, "vae")
            sv.tl.log_likelihood(a, n_samples=100, subset=mask, progress=False)
            iwae = float(np.nanmean(a.obs["vae_log_px"].to_numpy()[mask]))
            ari, nmi = kmeans_scores(a.obsm["X_vae"], labels)
            rows.append([len(a.uns["vae"]["history"]["epoch"]), wall, iwae, knn_accuracy(a.obsm["X_vae"], labels),
                         ari, nmi])
        r = np.array(rows)
        m, s = r.mean(0), r.std(0)
        print(f"| {name} | {m[0]:.0f} | {m[1]:.1f} | {m[2]:.1f} ± {s[2]:.1f} | {m[3]:.3f} ± {s[3]:.3f} | "
              f"{m[4]:.3f} ± {s[4]:.3f} | {m[5]:.3f} ± {s[5]:.3f} |", flush=True)
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
