"""Which training settings buy clustering quality? (issue 9, lever 5)

    python benchmarks/defaults_study.py --n-cells 20000 --configs default warmup-all batch256

Trains ``sv.tl.vae`` on a 3-batch ``datasets.simulate`` set with each named configuration
(same data, same seed, same split) and reports, per configuration: epochs run, training
wall time, held-out IWAE log p(x) (K=100, the validation cells), kNN accuracy of the cell
type (5-fold, k=15), k-means ARI and NMI (as many clusters as types) and batch mixing.
Quality only: time columns are indicative (run it alone for timings).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")

CONFIGS = {
    "default": {},  # the current defaults
    "batch128": {"batch_size": 128, "lr": 1e-3},  # the defaults before round 3 ("default" in its table)
    "warmup-all": {"batch_size": 128, "lr": 1e-3, "n_epochs_kl_warmup": "max"},  # KL over the whole budget
    "warmup-half": {"batch_size": 128, "lr": 1e-3, "n_epochs_kl_warmup": "half"},
    "batch256": {"batch_size": 256, "lr": 2e-3},
    "batch256-warmup-half": {"batch_size": 256, "lr": 2e-3, "n_epochs_kl_warmup": "half"},
    "epochs200": {"batch_size": 128, "lr": 1e-3, "max_epochs": 200},
    "bf16": {"batch_size": 128, "lr": 1e-3, "precision": "bfloat16"},
    "batch256-bf16": {"batch_size": 256, "lr": 2e-3, "precision": "bfloat16"},
}


def run(adata, name, threads):
    import sc_vi_ext as sv
    from sc_vi_ext.metrics import batch_mixing, kmeans_scores, knn_accuracy
    from sc_vi_ext.model_store import held_out_mask
    from sc_vi_ext.train import default_max_epochs

    kw = dict(CONFIGS[name])
    max_epochs = kw.get("max_epochs", default_max_epochs(adata.n_obs))
    if kw.get("n_epochs_kl_warmup") == "max":
        kw["n_epochs_kl_warmup"] = max_epochs
    elif kw.get("n_epochs_kl_warmup") == "half":
        kw["n_epochs_kl_warmup"] = max_epochs // 2
    a = adata.copy()
    t0 = time.perf_counter()
    sv.tl.vae(a, batch_key="batch", progress=False, n_threads=threads, **kw)
    wall = time.perf_counter() - t0
    mask = held_out_mask(a, "vae")
    sv.tl.log_likelihood(a, n_samples=100, subset=mask, progress=False)
    iwae = float(np.nanmean(a.obs["vae_log_px"].to_numpy()[mask]))
    lat = a.obsm["X_vae"]
    labels = a.obs["cell_type"].astype(str).to_numpy()
    ari, nmi = kmeans_scores(lat, labels)
    return {
        "config": name, "epochs": len(a.uns["vae"]["history"]["epoch"]), "wall_s": wall,
        "iwae_val": iwae, "knn": knn_accuracy(lat, labels), "kmeans_ari": ari, "kmeans_nmi": nmi,
        "mixing": batch_mixing(lat, a.obs["batch"]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-markers", type=int, default=20, help="simulate(n_markers=)")
    p.add_argument("--type-sd", type=float, default=0.3, help="simulate(type_sd=)")
    p.add_argument("--mean-library", type=float, default=1500.0, help="simulate(mean_library=)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args()
    import sc_vi_ext as sv

    adata = sv.datasets.simulate(args.n_cells, args.n_genes, n_batches=3, n_types=8, random_state=0,
                                 n_markers=args.n_markers, type_sd=args.type_sd, mean_library=args.mean_library)
    print(f"# data: {adata.uns['simulation']}")
    print(f"# uptime: {os.popen('uptime').read().strip()}")
    print("| config | epochs | wall s | held-out IWAE | kNN acc | k-means ARI | k-means NMI | batch mixing |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        r = run(adata, name, args.threads)
        print(f"| {r['config']} | {r['epochs']} | {r['wall_s']:.0f} | {r['iwae_val']:.1f} | {r['knn']:.3f} | "
              f"{r['kmeans_ari']:.3f} | {r['kmeans_nmi']:.3f} | {r['mixing']:.3f} |", flush=True)
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
