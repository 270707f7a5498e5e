"""What opens the held-out amortization gap on small data, and the encoder dropout that closes it.

    python -m benchmarks training
    python -m benchmarks training --quick

For each encoder dropout rate, ``tl.vae`` at its other defaults on the bundled PBMC cells (700,
one batch) and on a 3-batch simulation (``--n-cells`` × 2,000, 8 types), three seeds each (the
seed also draws the held-out 10 %). Per run: the amortization gap of the training and of the
held-out cells (``tl.amortization_gap``; every PBMC cell, 1,000 cells of the simulation), the
held-out IWAE log p(x) (K=100), 15-NN accuracy and k-means ARI/NMI of the latent against the
labels, and PCA's scores on the same data. The table gives the median over seeds; the figure
(``docs/img/dropout.png``, ``--figure``) the per-seed values.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ._common import ROOT, ours_iwae, parser, quality, quiet, run_worker, save, table, uptime

COLUMNS = (  # (key of a run's result, table column, format): the table's columns after the rate
    ("gap_train", "gap, training", ".2f"), ("gap_held_out", "gap, held-out", ".2f"),
    ("gap_ratio", "held-out / training", ".2f"), ("log_px_held_out", "held-out log p(x)", ".1f"),
    ("knn_acc", "kNN acc", ".3f"), ("kmeans_ari", "k-means ARI", ".3f"), ("kmeans_nmi", "k-means NMI", ".3f"),
    ("epochs", "epochs", ".0f"), ("seconds", "train s", ".1f"),
)


def _data(name: str, n_cells: int):
    import sc_vi_ext as sv

    if name == "PBMC":
        return sv.datasets.pbmc68k(), "bulk_labels", None
    return sv.datasets.simulate(n_cells, 2000, n_batches=3, n_types=8, random_state=0), "cell_type", "batch"


def worker(args) -> None:
    """Train once (dropout and seed from the config) and score the result."""
    quiet()
    import time

    import sc_vi_ext as sv

    cfg = json.loads(args._cfg)
    adata, label_key, batch_key = _data(cfg["data"], cfg["n_cells"])
    t0 = time.perf_counter()
    sv.tl.vae(adata, batch_key=batch_key, dropout=cfg["dropout"], random_state=cfg["seed"], progress=False,
              **({"max_epochs": 20} if cfg["quick"] else {}))
    seconds = time.perf_counter() - t0
    held = adata.obs_names.isin(adata.uns["vae"]["validation_obs_names"])
    sv.tl.amortization_gap(adata, n_cells=None if cfg["data"] == "PBMC" else 1000, progress=False)
    gap = adata.obs["vae_amortization_gap"].to_numpy()
    out = {"gap_train": float(np.nanmean(gap[~held])), "gap_held_out": float(np.nanmean(gap[held])),
           "log_px_held_out": float(ours_iwae(adata, np.flatnonzero(held)).mean()),
           "epochs": len(adata.uns["vae"]["history"]["epoch"]), "seconds": seconds}
    out["gap_ratio"] = out["gap_held_out"] / out["gap_train"]
    out.update(quality(adata.obsm["X_vae"], adata.obs[label_key]))
    Path(args._out).write_text(json.dumps(out))


def _pca_scores(name: str, n_cells: int) -> dict:
    import scanpy as sc

    adata, label_key, _ = _data(name, n_cells)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=min(50, adata.n_vars - 1), random_state=0)
    return quality(adata.obsm["X_pca"], adata.obs[label_key])


def figure(rows: dict, path: Path) -> None:
    """Per data set: held-out and training gap, and k-means ARI, against the dropout rate (one dot per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({d for d, _ in rows}, key=lambda d: d != "PBMC")
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6.4), squeeze=False, sharex=True)
    for j, name in enumerate(names):
        rates = sorted(r for d, r in rows if d == name)
        for key, label, colour in (("gap_held_out", "held-out cells", "C3"), ("gap_train", "training cells", "C0")):
            vals = [[run[key] for run in rows[name, r]] for r in rates]
            axes[0, j].plot(rates, [np.median(v) for v in vals], "-", color=colour, label=label)
            for r, v in zip(rates, vals, strict=True):
                axes[0, j].scatter([r] * len(v), v, s=12, color=colour, alpha=0.6)
        vals = [[run["kmeans_ari"] for run in rows[name, r]] for r in rates]
        axes[1, j].plot(rates, [np.median(v) for v in vals], "-", color="C2", label="VAE latent (median)")
        for r, v in zip(rates, vals, strict=True):
            axes[1, j].scatter([r] * len(v), v, s=12, color="C2", alpha=0.6)
        pca = rows[name, rates[0]][0].get("pca_ari")
        if pca is not None:
            axes[1, j].axhline(pca, color="0.4", ls="--", label="PCA (50)")
        axes[0, j].set_title(name)
        axes[0, j].set_ylabel("amortization gap (nats / cell)")
        axes[1, j].set_ylabel("k-means ARI")
        axes[1, j].set_xlabel("encoder dropout")
        axes[0, j].legend(frameon=False, fontsize=8)
        axes[1, j].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--sim-dropouts", type=float, nargs="+", default=[0.1, 0.4], help="rates tried on the simulation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--figure", default=str(ROOT / "docs" / "img" / "dropout.png"))
    args = p.parse_known_args(argv)[0]
    if args._worker:
        return worker(args)
    started = uptime()
    n_cells = 1000 if args.quick else args.n_cells
    seeds = args.seeds[:1] if args.quick else args.seeds
    plan = [("PBMC", args.dropouts), (f"simulation ({n_cells:,} cells)", args.sim_dropouts)]
    rows, tables = {}, []
    with tempfile.TemporaryDirectory(prefix="svtraining") as tmp:
        for name, rates in plan:
            data = "PBMC" if name == "PBMC" else "simulation"
            pca = _pca_scores(data, n_cells)
            for rate in rates:
                for seed in seeds:
                    cfg = {"data": data, "n_cells": n_cells, "dropout": rate, "seed": seed, "quick": args.quick}
                    r = run_worker("training", sys.executable, ["--_worker", "one", "--_cfg", json.dumps(cfg)],
                                   Path(tmp) / f"{data}-{rate}-{seed}.json")
                    if r:
                        r["pca_ari"] = pca["kmeans_ari"]
                        rows.setdefault((name, rate), []).append(r)
            cols = ["encoder dropout", *(col for _, col, _ in COLUMNS)]
            body = [[f"{rate:g}", *(f"{np.median([run[k] for run in rows[name, rate]]):{spec}}"
                                    for k, _, spec in COLUMNS)]
                    for rate in rates if (name, rate) in rows]
            body.append(["PCA (50)", "–", "–", "–", "–", f"{pca['knn_acc']:.3f}", f"{pca['kmeans_ari']:.3f}",
                         f"{pca['kmeans_nmi']:.3f}", "–", "–"])
            tables.append(table(f"{name}: median over seeds {', '.join(map(str, seeds))}", cols, body,
                                ["Gaps in nats per cell (tl.amortization_gap); log p(x): IWAE, K=100, on the seed's "
                                 "held-out 10 %, which differs between seeds; train s on a machine that may have "
                                 "been busy."]))
    if not args.quick and args.figure:
        figure(rows, Path(args.figure))
    raw = {f"{name}|{rate}": runs for (name, rate), runs in rows.items()}
    save("training", argv=argv if argv is not None else sys.argv[2:], quick=args.quick, tables=tables,
         started=started, raw=raw, data=f"sv.datasets.pbmc68k(); simulate({n_cells}, 2000, n_batches=3, n_types=8)")


if __name__ == "__main__":
    main()
