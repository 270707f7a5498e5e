"""Quality of a latent space: label separation and batch mixing (for tests, demo and benchmarks)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors


def knn_accuracy(rep: np.ndarray, labels, *, n_neighbors: int = 15, random_state: int = 0) -> float:
    """5-fold cross-validated accuracy of a kNN classifier of ``labels`` on ``rep``."""
    labels = np.asarray(labels).astype(str)
    n_splits = int(min(5, np.unique(labels, return_counts=True)[1].min())) if len(labels) else 2
    cv = StratifiedKFold(n_splits=max(2, n_splits), shuffle=True, random_state=random_state)
    pred = cross_val_predict(KNeighborsClassifier(n_neighbors=n_neighbors), rep, labels, cv=cv)
    return float((pred == labels).mean())


def batch_mixing(rep: np.ndarray, batches, *, n_neighbors: int = 30) -> float:
    """Mean entropy of batch labels among each cell's neighbours, divided by its maximum (1 = mixed)."""
    batches = np.asarray(batches).astype(str)
    cats, codes = np.unique(batches, return_inverse=True)
    if len(cats) < 2:
        return float("nan")
    nn = NearestNeighbors(n_neighbors=n_neighbors).fit(rep)
    idx = nn.kneighbors(rep, return_distance=False)
    freq = np.stack([(codes[idx] == c).mean(1) for c in range(len(cats))], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(freq > 0, freq * np.log(freq), 0.0), 1)
    return float(ent.mean() / np.log(len(cats)))


def kmeans_scores(rep: np.ndarray, labels, *, random_state: int = 0) -> tuple[float, float]:
    """ARI and NMI of k-means on ``rep`` (as many clusters as labels, 10 starts) against ``labels``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels).astype(str)
    pred = KMeans(n_clusters=len(np.unique(labels)), n_init=10, random_state=random_state).fit_predict(rep)
    return float(adjusted_rand_score(labels, pred)), float(normalized_mutual_info_score(labels, pred))
