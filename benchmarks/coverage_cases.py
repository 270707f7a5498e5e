"""The coverage benchmark's cases: which reference, which query, which query cells are altered.

Two kinds of alteration: a cell type held out of the reference (novel in the query), and a
known type whose query cells carry a state change (``perturb_state``: a few percent of the
genes it expresses shifted up or down by 1.5-2x in its query cells only).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

import sc_vi_ext as sv

STATE_GENES = 0.04  # share of the genes shifted in a state change
STATE_FOLD = (1.5, 2.0)  # range of the fold changes, up or down


def simulate_weak_de(n_cells, n_genes, *, n_types=8, n_batches=3, de_prob=0.08, de_lfc=0.45, random_state=0):
    """NB counts as ``sv.datasets.simulate`` draws them, but types differ by sparse, weak DE only."""
    rng = np.random.default_rng(random_state)
    base = rng.normal(0, 1.0, n_genes) - 1.0
    de = rng.random((n_types, n_genes)) < de_prob
    profiles = base + de * rng.choice([-de_lfc, de_lfc], (n_types, n_genes))
    batch_fx = rng.normal(0, 0.5, (n_batches, n_genes))
    cell_type, batch = rng.integers(n_types, size=n_cells), rng.integers(n_batches, size=n_cells)
    logits = profiles[cell_type] + batch_fx[batch]
    p = np.exp(logits - logits.max(1, keepdims=True))
    mu = p / p.sum(1, keepdims=True) * np.exp(rng.normal(np.log(1500), 0.4, n_cells))[:, None]
    X = sp.csr_matrix(rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32))
    obs = {"cell_type": [f"type_{t}" for t in cell_type], "batch": [f"batch_{b}" for b in batch]}
    ad = AnnData(X=X, obs=dict(obs))
    ad.obs_names = [f"cell_{i}" for i in range(n_cells)]
    ad.var_names = [f"gene_{g}" for g in range(n_genes)]
    ad.obs = ad.obs.astype("category")
    return ad


def perturb_state(adata: AnnData, cells: np.ndarray, *, share=STATE_GENES, fold=STATE_FOLD, random_state=0):
    """Shift ``share`` of the genes that ``cells`` express most by a fold in ``fold``, half up, half down.

    The genes are drawn among the top half of the genes by mean count in ``cells``. Down: binomial
    thinning of each count with probability 1 / fold; up: each count plus a Poisson draw with
    mean (fold - 1) x count (its mean becomes fold x count). Changes ``adata.X`` in place (and
    ``layers["counts"]`` where present); returns the shifted genes' names and their log2 folds.
    """
    rng = np.random.default_rng(random_state)
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X).copy()
    rows = np.flatnonzero(cells)
    expressed = np.argsort(-X[rows].mean(0))[: adata.n_vars // 2]
    genes = rng.choice(expressed, max(2, int(round(share * adata.n_vars))), replace=False)
    f = rng.uniform(*fold, len(genes))
    up = np.arange(len(genes)) % 2 == 0
    block = X[np.ix_(rows, genes)]
    thinned = rng.binomial(block.astype(np.int64), 1 / f[None, :])
    raised = block + rng.poisson(block * (f[None, :] - 1))
    X[np.ix_(rows, genes)] = np.where(up[None, :], raised, thinned)
    adata.X = sp.csr_matrix(X.astype(np.float32))
    if "counts" in adata.layers:
        adata.layers["counts"] = adata.X.copy()
    return np.asarray(adata.var_names[genes]).astype(str), np.where(up, np.log2(f), -np.log2(f))


def make_case(name: str, quick: bool) -> dict:
    """One case: ``reference``, ``query``, ``label`` column, ``altered`` mask of the query, ``settings``
    for ``tl.vae`` and, for a state change, the ``shifted`` genes and the ``group`` that carries it."""
    n, g = (4000, 1000) if quick else (12000, 2000)
    kind, _, arg = name.partition(":")
    if kind.startswith("pbmc"):
        ad = sv.datasets.pbmc68k()
        held = [] if kind == "pbmc_state" else [arg or "CD19+ B"]
        rng = np.random.default_rng(0)
        known = np.flatnonzero(~ad.obs["bulk_labels"].isin(held).to_numpy())
        to_ref = np.zeros(ad.n_obs, bool)
        to_ref[rng.choice(known, int(round(len(known) * 2 / 3)), replace=False)] = True
        ref, query = ad[to_ref].copy(), ad[~to_ref].copy()
        case = {"reference": ref, "query": query, "label": "bulk_labels", "settings": {"train_size": 0.8}}
        state = arg or "Dendritic" if kind == "pbmc_state" else None
        altered = query.obs["bulk_labels"].isin(held if state is None else [state]).to_numpy()
    else:
        if kind == "sim_weak_de":
            ad, held, state = simulate_weak_de(n, g, random_state=1), ["type_7"], None
        elif kind == "sim_state":
            ad, held, state = sv.datasets.simulate(n, g, n_batches=3, n_types=8, random_state=0), [], arg or "type_3"
        else:  # sim_two_types
            ad = sv.datasets.simulate(n, g, n_batches=3, n_types=8, random_state=0)
            held, state = ["type_6", "type_7"], None
        in_ref = ad.obs["batch"].isin(["batch_0", "batch_1"]) & ~ad.obs["cell_type"].isin(held)
        query = ad[ad.obs["batch"] == "batch_2"].copy()
        settings = {"batch_key": "batch", **({"max_epochs": 60} if quick else {})}
        case = {"reference": ad[in_ref].copy(), "query": query, "label": "cell_type", "settings": settings}
        altered = query.obs["cell_type"].isin(held if state is None else [state]).to_numpy()
    if state is not None:
        case["shifted"], case["log2_fold"] = perturb_state(case["query"], altered)
        case["group"] = state
    case["altered"] = altered
    return case
