"""How much does semi-amortized refinement move kNN neighbourhoods? (PBMC, package defaults)

    python benchmarks/refine_knn.py

Prints the mean Jaccard overlap of each cell's 15 nearest neighbours in X_vae and in
X_vae_refined, the fraction of cells whose neighbourhood changes by more than half, the
kNN accuracy of bulk_labels in both, and the ELBO gained.
"""

import numpy as np
import scanpy as sc
from sklearn.neighbors import NearestNeighbors

import sc_vi_ext as sv
from sc_vi_ext.metrics import knn_accuracy

sc.settings.verbosity = 0
adata = sv.datasets.pbmc68k()
sv.tl.vae(adata, progress=False)
sv.tl.refine(adata, progress=False)


def knn(rep, k=15):
    return NearestNeighbors(n_neighbors=k + 1).fit(rep).kneighbors(rep, return_distance=False)[:, 1:]


a, b = knn(adata.obsm["X_vae"]), knn(adata.obsm["X_vae_refined"])
jac = np.array([len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a, b, strict=True)])
r = adata.uns["vae"]["refine"]
print(f"mean Jaccard of 15-NN sets, X_vae vs X_vae_refined: {jac.mean():.3f} (median {np.median(jac):.3f})")
print(f"cells with Jaccard < 0.5: {(jac < 0.5).mean():.1%}")
print(f"kNN accuracy bulk_labels: X_vae {knn_accuracy(adata.obsm['X_vae'], adata.obs['bulk_labels']):.3f}, "
      f"refined {knn_accuracy(adata.obsm['X_vae_refined'], adata.obs['bulk_labels']):.3f}")
print(f"ELBO gained: mean {r['elbo_gain_mean']:.2f}, median {r['elbo_gain_median']:.2f} nats/cell; "
      f"steps mean {r['steps_mean']:.0f}, max {r['steps_max']}")
