"""Quality of the latent, scored as the field scores integration: sc_vi_ext, scvi-tools and PCA.

    python -m benchmarks quality --scvi-python .venv-bench/bin/python
    python -m benchmarks quality --quick --scvi-python .venv-bench/bin/python

Each tool runs with its defaults (sc_vi_ext also with ``precision="bfloat16"`` where the CPU
has bfloat16 instructions; scvi-tools to its full default epochs) on the same data with the
same held-out 10 %: a 3-batch simulation (``--n-cells`` × ``--n-genes``, 8 types) and the
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

NAMES = {"ours": "sc_vi_ext", "ours-bf16": "sc_vi_ext bfloat16", "scvi": "scvi-tools", "pca": "PCA (50)"}


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

        sv.tl.vae(adata, batch_key=batch_key, progress=False, precision=cfg.get("precision", "float32"),
                  **({"max_epochs": 20} if cfg["quick"] else {}))
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
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 row")
    args = p.parse_known_args(argv)[0]
    if args._worker:
        return worker(args)
    started = uptime()
    from sc_vi_ext.acceleration import bf16_fast_on_cpu

    tools = ["ours"] + (["ours-bf16"] if bf16_fast_on_cpu() and not args.no_bf16 else [])
    tools += ["scvi"] if args.scvi_python else []
    tables, descs = [], []
    with tempfile.TemporaryDirectory(prefix="svquality") as tmp:
        for name, adata, label_key, batch_key, desc in _datasets(args):
            descs.append(desc)
            path = Path(tmp) / f"{name}.h5ad"
            adata.write_h5ad(path)
            res = {}
            for t in tools:
                cfg = {"batch_key": batch_key, "quick": args.quick, "precision": "bfloat16" if t == "ours-bf16" else
                       "float32"}
                python = args.scvi_python if t == "scvi" else sys.executable
                out = Path(tmp) / f"{name}-{t}.json"
                r = run_worker("quality", python, ["--_worker", t.split("-")[0], "--_data", str(path),
                                                   "--_cfg", json.dumps(cfg)], out)
                if r:
                    r["latent"] = np.load(str(out) + ".npy")
                    res[t] = r
            res["pca"] = {"latent": _pca(adata), "iwae": None, "epochs": None}
            for t, r in res.items():
                adata.obsm[f"X_{t}"] = r["latent"]
                batches = None if batch_key is None else adata.obs[batch_key]
                r.update(quality(r["latent"], adata.obs[label_key], batches))
            scib = _run_scib(adata, res, label_key, batch_key, tmp, name, args)
            tables.append(_table(name, res, scib, batch_key))
    save("quality", argv=argv if argv is not None else sys.argv[2:], quick=args.quick, tables=tables, started=started,
         data="; ".join(descs), versions=peer_versions(args.scvi_python) if args.scvi_python else "")


def _run_scib(adata, res, label_key, batch_key, tmp, name, args) -> dict:
    if not args.scvi_python:
        return {}
    path = Path(tmp) / f"{name}-scib.h5ad"
    b = adata[:, :0].copy()
    b.obsm["X_pca"] = res["pca"]["latent"]
    b.write_h5ad(path)
    cfg = {"keys": [f"X_{t}" for t in res], "label_key": label_key, "batch_key": batch_key}
    r = run_worker("quality", args.scvi_python, ["--_worker", "scib", "--_data", str(path), "--_cfg", json.dumps(cfg)],
                   Path(tmp) / f"{name}-scib.json")
    return r or {}


def _table(name: str, res: dict, scib: dict, batch_key) -> dict:
    metrics = list(scib)
    cols = ["tool", "epochs", "held-out log p(x)", "kNN acc", "k-means ARI", "k-means NMI", "batch mixing"]
    rows = []
    for t, r in res.items():
        row = [NAMES[t], fmt(r["epochs"], "d"), fmt(r["iwae"], ".1f"), fmt(r["knn_acc"], ".3f"),
               fmt(r["kmeans_ari"], ".3f"), fmt(r["kmeans_nmi"], ".3f"), fmt(r["mixing"], ".3f")]
        row += [_num(scib.get(m, {}).get(f"X_{t}")) for m in metrics]
        rows.append(row)
    notes = ["scib-metrics columns are raw scores (not min-max scaled); higher is better."] if metrics else [
        "scib-metrics not run (no --scvi-python)."]
    if batch_key is None:
        notes.append("One batch: no batch-correction metrics.")
    return table(f"{name}: each tool at its defaults", cols + metrics, rows, notes)


def _num(v) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return "–"


if __name__ == "__main__":
    main()
