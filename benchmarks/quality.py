"""Quality of the latent, scored as the field scores integration: sc_vi_ext, scvi-tools and PCA.

    python -m benchmarks quality --scvi-python .venv-bench/bin/python
    python -m benchmarks quality --quick --scvi-python .venv-bench/bin/python

Each tool runs with its defaults (sc_vi_ext with ``--seeds`` random states, median of each score
over them, its precision "auto"; also with ``precision="float32"`` where "auto" picks bfloat16,
unless ``--no-bf16``; scvi-tools to its full default epochs, seed 0) on the same data, held-out
10 % drawn by the seed (scvi-tools gets seed 0's): a 3-batch simulation (``--n-cells`` × ``--n-genes``, 8 types) and the
bundled PBMC cells (one batch, labels ``bulk_labels``). Scores: held-out IWAE log p(x) (K=100,
nats per cell; higher is better), kNN accuracy, k-means ARI/NMI, batch mixing, and
scib-metrics' ``Benchmarker`` (bio conservation: isolated labels, k-means NMI/ARI, silhouette,
cLISI; batch correction: BRAS, iLISI, kBET, graph connectivity, PCR comparison; on PBMC, which
has one batch, bio conservation only). scib-metrics needs Python >= 3.12 and JAX: it runs in
the ``--scvi-python`` interpreter (the ``bench`` extra installs both).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ._common import (
    K_IWAE,
    SCVI_VENV_HELP,
    fmt,
    ours_iwae,
    parser,
    peer_versions,
    quality,
    quiet,
    run_worker,
    save,
    shared_split,
    table,
    uptime,
)

NAMES = {"ours": "sc_vi_ext", "ours-f32": "sc_vi_ext float32", "scvi": "scvi-tools", "pca": "PCA (50)"}


def worker(args) -> None:
    quiet()
    import anndata as ad

    cfg = json.loads(args._cfg)
    adata = ad.read_h5ad(args._data)
    batch_key = cfg["batch_key"]
    _, va = shared_split(adata.n_obs)
    if args._worker == "scib":
        return _scib(adata, cfg, args._out)
    if args._worker == "ours":
        import sc_vi_ext as sv

        sv.tl.vae(adata, batch_key=batch_key, progress=False, precision=cfg.get("precision", "auto"),
                  random_state=cfg.get("seed", 0), **({"max_epochs": 20} if cfg["quick"] else {}))
        va = np.flatnonzero(adata.obs_names.isin(adata.uns["vae"]["validation_obs_names"]))  # the seed's
        latent, ll = adata.obsm["X_vae"], ours_iwae(adata, va)
        epochs = len(adata.uns["vae"]["history"]["epoch"])
    else:
        import scvi

        scvi.settings.seed = 0
        tr, _ = shared_split(adata.n_obs)
        scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
        m = scvi.model.SCVI(adata)
        m.train(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                datasplitter_kwargs={"external_indexing": [tr, va]}, **({"max_epochs": 3} if cfg["quick"] else {}))
        latent = m.get_latent_representation()
        ll = m.get_marginal_ll(indices=va, n_mc_samples=K_IWAE, return_mean=False).numpy()
        epochs = m.history["elbo_train"].shape[0]
    np.save(args._out + ".npy", np.asarray(latent, np.float32))
    Path(args._out).write_text(json.dumps({"iwae": float(np.mean(ll)), "epochs": int(epochs)}))


def _scib(adata, cfg: dict, out: str) -> None:
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    keys = cfg["keys"]
    batch = BatchCorrection() if cfg["batch_key"] else None
    key = cfg["batch_key"] or "one_batch"
    if key not in adata.obs:
        adata.obs[key] = "0"
    bm = Benchmarker(adata, batch_key=key, label_key=cfg["label_key"], embedding_obsm_keys=keys,
                     bio_conservation_metrics=BioConservation(), batch_correction_metrics=batch,
                     pre_integrated_embedding_obsm_key="X_pca", n_jobs=2, progress_bar=False)
    bm.benchmark()
    df = bm.get_results(min_max_scale=False)
    Path(out).write_text(df.astype(str).to_json())


def _datasets(args):
    import sc_vi_ext as sv

    n, g = (2000, 300) if args.quick else (args.n_cells, args.n_genes)
    sim = sv.datasets.simulate(n, g, n_batches=3, n_types=8, random_state=0)
    yield "simulation", sim, "cell_type", "batch", f"simulate({n}, {g}, n_batches=3, n_types=8)"
    pb = sv.datasets.pbmc68k()
    yield "PBMC", pb, "bulk_labels", None, f"sv.datasets.pbmc68k() ({pb.n_obs} × {pb.n_vars})"


def _pca(adata) -> np.ndarray:
    import scanpy as sc

    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.pca(b, n_comps=min(50, b.n_vars - 1), random_state=0)
    return b.obsm["X_pca"]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__ + SCVI_VENV_HELP)
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--no-bf16", action="store_true", help="skip the float32 row where the default is bfloat16")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sc_vi_ext's random states (median)")
    args = p.parse_known_args(argv)[0]
    if args._worker:
        return worker(args)
    started = uptime()
    from sc_vi_ext.acceleration import bf16_fast_on_cpu

    tools = ["ours"] + (["ours-f32"] if bf16_fast_on_cpu() and not args.no_bf16 else [])
    tools += ["scvi"] if args.scvi_python else []
    tables, descs = [], []
    seeds = args.seeds[:1] if args.quick else args.seeds
    with tempfile.TemporaryDirectory(prefix="svquality") as tmp:
        for name, adata, label_key, batch_key, desc in _datasets(args):
            descs.append(desc)
            path = Path(tmp) / f"{name}.h5ad"
            adata.write_h5ad(path)
            runs = {}  # (tool, seed) -> result
            for t in tools:
                for seed in (seeds if t == "ours" else seeds[:1]):
                    cfg = {"batch_key": batch_key, "quick": args.quick, "seed": seed,
                           "precision": "float32" if t == "ours-f32" else "auto"}
                    python = args.scvi_python if t == "scvi" else sys.executable
                    out = Path(tmp) / f"{name}-{t}-{seed}.json"
                    r = run_worker("quality", python, ["--_worker", t.split("-")[0], "--_data", str(path),
                                                       "--_cfg", json.dumps(cfg)], out)
                    if r:
                        r["latent"] = np.load(str(out) + ".npy")
                        runs[t, seed] = r
            runs["pca", 0] = {"latent": _pca(adata), "iwae": None, "epochs": None}
            for (t, seed), r in runs.items():
                adata.obsm[f"X_{t}_{seed}"] = r["latent"]
                batches = None if batch_key is None else adata.obs[batch_key]
                r.update(quality(r["latent"], adata.obs[label_key], batches))
            scib = _run_scib(adata, runs, label_key, batch_key, tmp, name, args)
            tables.append(_table(name, runs, scib, batch_key, seeds))
    save("quality", argv=argv if argv is not None else sys.argv[2:], quick=args.quick, tables=tables, started=started,
         data="; ".join(descs), versions=peer_versions(args.scvi_python) if args.scvi_python else "")


def _run_scib(adata, runs, label_key, batch_key, tmp, name, args) -> dict:
    if not args.scvi_python:
        return {}
    path = Path(tmp) / f"{name}-scib.h5ad"
    b = adata[:, :0].copy()
    b.obsm["X_pca"] = runs["pca", 0]["latent"]
    b.write_h5ad(path)
    cfg = {"keys": [f"X_{t}_{seed}" for t, seed in runs], "label_key": label_key, "batch_key": batch_key}
    r = run_worker("quality", args.scvi_python, ["--_worker", "scib", "--_data", str(path), "--_cfg", json.dumps(cfg)],
                   Path(tmp) / f"{name}-scib.json")
    return r or {}


def _median(runs: dict, t: str, get) -> float | None:
    vals = [get(r, seed) for (tool, seed), r in runs.items() if tool == t]
    vals = [float(v) for v in vals if v is not None and np.isfinite(float(v))]
    return float(np.median(vals)) if vals else None


def _table(name: str, runs: dict, scib: dict, batch_key, seeds) -> dict:
    metrics = list(scib)
    cols = ["tool", "epochs", "held-out log p(x)", "kNN acc", "k-means ARI", "k-means NMI", "batch mixing"]
    rows = []
    for t in dict.fromkeys(tool for tool, _ in runs):
        med = {k: _median(runs, t, lambda r, s, k=k: r[k]) for k in
               ("epochs", "iwae", "knn_acc", "kmeans_ari", "kmeans_nmi", "mixing")}
        many = t == "ours" and len(seeds) > 1
        label = NAMES[t] + (f" (median of seeds {', '.join(map(str, seeds))})" if many else "")
        row = [label, fmt(med["epochs"], ".0f"), fmt(med["iwae"], ".1f"), fmt(med["knn_acc"], ".3f"),
               fmt(med["kmeans_ari"], ".3f"), fmt(med["kmeans_nmi"], ".3f"), fmt(med["mixing"], ".3f")]
        row += [fmt(_median(runs, t, lambda r, s, m=m, t=t: _num(scib.get(m, {}).get(f"X_{t}_{s}"))), ".3f")
                for m in metrics]
        rows.append(row)
    per_seed = [f"seed {s}: ARI {runs['ours', s]['kmeans_ari']:.3f}, kNN {runs['ours', s]['knn_acc']:.3f}, "
                f"held-out log p(x) {runs['ours', s]['iwae']:.1f}" for s in seeds if ("ours", s) in runs]
    notes = ["scib-metrics columns are raw scores (not min-max scaled); higher is better."] if metrics else [
        "scib-metrics not run (no --scvi-python)."]
    notes.append("sc_vi_ext per seed: " + "; ".join(per_seed) + ". Each seed holds out its own 10 %; "
                 "scvi-tools and the float32 row: seed 0.")
    if batch_key is None:
        notes.append("One batch: no batch-correction metrics.")
    return table(f"{name}: each tool at its defaults", cols + metrics, rows, notes)


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


if __name__ == "__main__":
    main()
