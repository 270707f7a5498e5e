"""Reference coverage: are the cell types a reference lacks flagged in a mapped query?

    python -m benchmarks coverage [--quick] [--cases sim_two_types,sim_weak_de,pbmc]

Cases (each: reference trained with ``sv.tl.vae`` defaults, query mapped with ``sv.tl.vae_map``):

- ``sim_two_types``: ``sv.datasets.simulate`` 12,000 cells x 2,000 genes, 8 types, 3 batches;
  reference = batches 0-1 without types 6 and 7, query = batch 2 with every type.
- ``sim_weak_de``: the same design with weaker differential expression (each gene DE in a
  type with probability 0.08, log-fold +-0.45, no marker genes); type 7 left out.
- ``pbmc``: ``sv.datasets.pbmc68k`` (no batches); CD19+ B cells left out; the other cells split
  at random, 2/3 to the reference (``train_size=0.8``, for enough held-out cells to calibrate on)
  and 1/3 to the query, which also gets every B cell. ``pbmc:<label>`` leaves out another
  ``bulk_labels`` type instead (the default run adds the CD14+ monocytes, the dendritic cells
  and the NK cells).

Scores, novel type vs known types among the query cells: ``sv.tl.reference_coverage`` (its
coverage, and its flag at the default alpha), and three baselines in the latent space: kNN
label-transfer uncertainty (1 - top vote share of 15 reference neighbours), the mean distance
to the 15 nearest reference cells, and minus the log density under the reference's aggregated
posterior (the mixture of every reference cell's q(z|x)). A baseline's flag is its score above
the 95th percentile of the reference's held-out cells (the false-flag budget of our default alpha, 0.05).
``--quick``: smaller simulations and PBMC, for iterating. Times are wall-clock on a shared machine.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch
from anndata import AnnData
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import sc_vi_ext as sv
from sc_vi_ext.model_store import get_model, held_out_mask, stored_loader

from ._common import parser, save, table, uptime


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


def make_case(name: str, quick: bool):
    """Return (reference, query, label column, novel labels, tl.vae settings)."""
    n, g = (4000, 1000) if quick else (12000, 2000)
    if name.startswith("sim_two_types"):
        ad = sv.datasets.simulate(n, g, n_batches=3, n_types=8, random_state=0)
        novel = ["type_6", "type_7"]
    elif name.startswith("sim_weak_de"):
        ad = simulate_weak_de(n, g, random_state=1)
        novel = ["type_7"]
    else:  # "pbmc" (B cells left out) or "pbmc:<bulk label>"
        ad = sv.datasets.pbmc68k()
        novel = [name.split(":", 1)[1] if ":" in name else "CD19+ B"]
        rng = np.random.default_rng(0)
        known = np.flatnonzero(~ad.obs["bulk_labels"].isin(novel).to_numpy())
        to_ref = np.zeros(ad.n_obs, bool)
        to_ref[rng.choice(known, int(round(len(known) * 2 / 3)), replace=False)] = True
        return ad[to_ref].copy(), ad[~to_ref].copy(), "bulk_labels", novel, {"train_size": 0.8}
    in_ref = ad.obs["batch"].isin(["batch_0", "batch_1"]) & ~ad.obs["cell_type"].isin(novel)
    query = ad[ad.obs["batch"] == "batch_2"].copy()
    settings = {"batch_key": "batch"}
    if quick:
        settings["max_epochs"] = 60
    return ad[in_ref].copy(), query, "cell_type", novel, settings


@torch.no_grad()
def aggregated_posterior_nll(ref: AnnData, query: AnnData, key="vae", n_max=3000, seed=0):
    """-log of the density of each query latent mean under the mixture of reference q(z|x) (and of held-out cells)."""
    module = get_model(ref, key)
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(~held_out_mask(ref, key))
    idx = np.sort(rng.choice(train, min(n_max, len(train)), replace=False))
    means, lvs = [], []
    for mb in stored_loader(ref, key, idx):
        m, lv = module.inference(mb.x, mb.batch, mb.cov)
        means.append(m[:, :module.n_latent])
        lvs.append(lv[:, :module.n_latent])
    mu, lv = torch.cat(means).double(), torch.cat(lvs).double()

    def nll(z):
        z = torch.as_tensor(np.asarray(z), dtype=torch.float64)
        out = []
        for lo in range(0, len(z), 512):
            d = z[lo:lo + 512, None, :] - mu[None]
            lp = -0.5 * (d.pow(2) / lv.exp() + lv + np.log(2 * np.pi)).sum(-1)
            out.append(-(torch.logsumexp(lp, 1) - np.log(len(mu))))
        return torch.cat(out).numpy()

    return nll(query.obsm[f"X_{key}"]), nll(ref.obsm[f"X_{key}"][held_out_mask(ref, key)])


def baselines(ref: AnnData, query: AnnData, label: str, key="vae"):
    """Baseline scores (higher = more novel) on the query and on the reference's held-out cells."""
    val = held_out_mask(ref, key)
    lat, q = ref.obsm[f"X_{key}"], query.obsm[f"X_{key}"]
    knn = KNeighborsClassifier(n_neighbors=15).fit(lat[~val], ref.obs[label].astype(str).to_numpy()[~val])
    nn = NearestNeighbors(n_neighbors=15).fit(lat[~val])
    apn_q, apn_val = aggregated_posterior_nll(ref, query, key)
    return {
        "knn_uncertainty": (1 - knn.predict_proba(q).max(1), 1 - knn.predict_proba(lat[val]).max(1)),
        "latent_distance": (nn.kneighbors(q)[0].mean(1), nn.kneighbors(lat[val])[0].mean(1)),
        "aggregated_posterior": (apn_q, apn_val),
    }


def run_case(name: str, quick: bool) -> list[dict]:
    ref, query, label, novel, settings = make_case(name, quick)
    t0 = time.perf_counter()
    sv.tl.vae(ref, progress=False, **settings)
    sv.tl.vae_map(query, reference=ref, progress=False)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    sv.tl.reference_coverage(query, reference=ref, progress=False)
    t_cov = time.perf_counter() - t0
    is_novel = query.obs[label].isin(novel).to_numpy()
    res = query.uns["vae"]["coverage"]
    common = {"case": name, "n_query": int(query.n_obs), "n_novel": int(is_novel.sum()),
              "n_genes": int(query.n_vars), "n_calibration": res["calibration"]["n_cells"]}
    flag = query.obs["vae_uncovered"].to_numpy()
    rows = [{**common, "score": "reference_coverage", "auroc": roc_auc_score(is_novel, -query.obs["vae_coverage"]),
             "novel_flagged": float(flag[is_novel].mean()), "known_flagged": float(flag[~is_novel].mean()),
             "calibration_flagged": res["calibration"]["frac_flagged"], "seconds": t_cov,
             "seconds_per_1000": 1000 * t_cov / query.n_obs, "fit_seconds": t_fit}]
    for c in ("model_miss", "programme", "latent_novelty", "encoder_miss"):
        rows.append({**common, "score": f"  component: {c}", "auroc": roc_auc_score(is_novel, query.obs[f"vae_{c}"])})
    for b, (s_q, s_val) in baselines(ref, query, label).items():
        f = s_q > np.quantile(s_val, 0.95)
        rows.append({**common, "score": f"baseline: {b}", "auroc": roc_auc_score(is_novel, s_q),
                     "novel_flagged": float(f[is_novel].mean()), "known_flagged": float(f[~is_novel].mean())})
    return rows


def coverage_table(rows: list[dict]) -> dict:
    out = []
    for r in rows:
        def pct(k, r=r):
            return f"{100 * r[k]:.1f}%" if k in r else ""
        sec = f"{r['seconds_per_1000']:.1f}" if "seconds_per_1000" in r else ""
        out.append([f"{r['case']} ({r['n_query']:,} query, {r['n_novel']:,} novel)", r["score"].strip(),
                    f"{r['auroc']:.3f}", pct("novel_flagged"), pct("known_flagged"), sec])
    return table("Novel-type query cells against known ones: AUROC and flag rates",
                 ["case", "score", "AUROC", "novel flagged", "known flagged", "s / 1,000 query cells"], out,
                 ["Flags: reference_coverage at its default alpha (0.05); a baseline above the 95th percentile of "
                  "the reference's held-out cells (the same false-flag budget). Time: reference_coverage only "
                  "(training and mapping excluded)."])


def main(argv=None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--cases", default="sim_two_types,sim_weak_de,pbmc,pbmc:CD14+ Monocyte,pbmc:Dendritic,"
                                       "pbmc:CD56+ NK")
    args = ap.parse_known_args(argv)[0]
    started = uptime()
    sc.settings.verbosity = 0
    rows = []
    for name in args.cases.split(","):
        rows += run_case(name, args.quick)
    save("coverage", argv=argv if argv is not None else sys.argv[2:], quick=args.quick,
         tables=[coverage_table(rows)], started=started, raw={"rows": rows},
         data="see the cases in `python -m benchmarks coverage --help`")


if __name__ == "__main__":
    main()
