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
coverage, and its flag at the default alpha; its group test, each cell scored by its group's
score, with three kinds of groups: the query's true cell types, labels transferred from the
reference by 15 nearest training cells, and the query's leiden clusters), and three baselines in the latent space: kNN
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
import torch
from anndata import AnnData
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import sc_vi_ext as sv
from sc_vi_ext.diagnostics.coverage import COMPONENTS, EXTRA, GROUP, LOCAL, OPTIONAL, SHARED
from sc_vi_ext.model_store import get_model, held_out_mask, stored_loader

from ._common import parser, save, table, uptime
from .coverage_cases import make_case


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
    case = make_case(name, quick)
    ref, query, label, altered = case["reference"], case["query"], case["label"], case["altered"]
    t0 = time.perf_counter()
    sv.tl.vae(ref, progress=False, **case["settings"])
    sv.tl.vae_map(query, reference=ref, progress=False)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    sv.tl.reference_coverage(query, reference=ref, labels_key=label, groupby=label, progress=False)
    t_cov = time.perf_counter() - t0
    res = query.uns["vae"]["coverage"]
    common = {"case": name, "n_query": int(query.n_obs), "n_altered": int(altered.sum()),
              "n_genes": int(query.n_vars), "n_calibration": res["calibration"]["n_cells"]}
    flag = query.obs["vae_uncovered"].to_numpy()
    top = {"auroc": roc_auc_score(altered, -query.obs["vae_coverage"]), "altered_flagged": float(flag[altered].mean()),
           "unaltered_flagged": float(flag[~altered].mean()), "calibration_flagged": res["calibration"]["frac_flagged"],
           "seconds": t_cov, "seconds_per_1000": 1000 * t_cov / query.n_obs, "fit_seconds": t_fit}
    if "shifted" in case:  # the state's group: are its driving genes the shifted ones?
        genes = res["groups"][case["group"]].get("top_genes", [])[:20]
        top["driving_gene_precision"] = float(np.isin(genes, case["shifted"]).mean()) if genes else 0.0
    rows = [{**common, "score": "reference_coverage", **top}]
    rows += group_rows(common, case, query, res)
    # the same test on groups a user has: labels transferred from the reference, the query's leiden clusters
    other = query.copy()
    val = held_out_mask(ref, "vae")
    knn = KNeighborsClassifier(n_neighbors=15).fit(ref.obsm["X_vae"][~val], ref.obs[label].astype(str)[~val])
    other.obs["transferred"] = knn.predict(other.obsm["X_vae"])
    sc.pp.neighbors(other, use_rep="X_vae", random_state=0)
    sc.tl.leiden(other, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    for col, by in (("transferred", "transferred labels"), ("leiden", "leiden clusters")):
        sv.tl.reference_coverage(other, reference=ref, labels_key=label, groupby=col, progress=False)
        rows += group_rows(common, case, other, other.uns["vae"]["coverage"], by=by)
    # all reported; the default combines COMPONENTS and GROUP (+ LOCAL, + SHARED)
    for c in COMPONENTS + GROUP + LOCAL + SHARED + EXTRA + OPTIONAL:
        rows.append({**common, "score": f"  component: {c}", "auroc": roc_auc_score(altered, query.obs[f"vae_{c}"])})
    for b, (s_q, s_val) in baselines(ref, query, label).items():
        f = s_q > np.quantile(s_val, 0.95)
        rows.append({**common, "score": f"baseline: {b}", "auroc": roc_auc_score(altered, s_q),
                     "altered_flagged": float(f[altered].mean()), "unaltered_flagged": float(f[~altered].mean())})
    return rows


def group_rows(common: dict, case: dict, query: AnnData, res: dict, by: str = "true labels") -> list[dict]:
    """The group test's rows: cells scored by their group's score (untested groups lowest), its flags and,
    with cell flags added, the flags a user sees; for a state change, the precision of the group's shift genes."""
    altered = case["altered"]
    score = query.obs["vae_group_shift"].to_numpy()
    score = np.where(np.isnan(score), np.nanmin(score, initial=0.0) - 1, score)
    flag = query.obs["vae_group_shifted"].to_numpy()
    either = flag | query.obs["vae_uncovered"].to_numpy()
    tested = sum("shift_statistic" in g for g in res["groups"].values())
    row = {**common, "score": f"group test ({by}: {tested} of {len(res['groups'])} tested)",
           "auroc": roc_auc_score(altered, score),
           "altered_flagged": float(flag[altered].mean()), "unaltered_flagged": float(flag[~altered].mean())}
    if "shifted" in case and by == "true labels":
        genes = res["groups"][case["group"]].get("shift_genes", [])[:20]
        row["driving_gene_precision"] = float(np.isin(genes, case["shifted"]).mean()) if genes else 0.0
    return [row, {**common, "score": f"  cell or group flag ({by})", "altered_flagged": float(either[altered].mean()),
                  "unaltered_flagged": float(either[~altered].mean())}]


def coverage_table(rows: list[dict]) -> dict:
    out = []
    for r in rows:
        def pct(k, r=r):
            return f"{100 * r[k]:.1f}%" if k in r else ""
        sec = f"{r['seconds_per_1000']:.1f}" if "seconds_per_1000" in r else ""
        prec = f"{r['driving_gene_precision']:.2f}" if "driving_gene_precision" in r else ""
        out.append([f"{r['case']} ({r['n_query']:,} query, {r['n_altered']:,} altered)", r["score"].strip(),
                    f"{r['auroc']:.3f}" if "auroc" in r else "", pct("altered_flagged"), pct("unaltered_flagged"),
                    prec, sec])
    return table("Altered query cells (a held-out type or a state change) against the others: AUROC and flag rates",
                 ["case", "score", "AUROC", "altered flagged", "unaltered flagged", "driving genes: precision@20",
                  "s / 1,000 query cells"], out,
                 ["Flags: reference_coverage at its default alpha (0.05); a baseline above the 95th percentile of "
                  "the reference's held-out cells (the same false-flag budget). Time: reference_coverage only "
                  "(training and mapping excluded). Driving genes: the share of the "
                  "state's group's 20 top genes that are shifted genes."])


def main(argv=None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--cases", default="sim_two_types,sim_weak_de,sim_state,pbmc,pbmc:CD14+ Monocyte,"
                                       "pbmc:Dendritic,pbmc:CD56+ NK,pbmc_state")
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
