"""Speed (and quality) benchmark: sc_vi_ext against scvi-tools on the same AnnData.

One command runs every measurement; each tool runs in its own subprocess (so peak RSS is
per tool and neither inherits the other's allocator state), one after the other, on the
same data written once to a temporary h5ad file.

    python benchmarks/speed.py --n-cells 20000 --n-genes 2000 --epochs 3 [--end-to-end] [--pbmc]

Sections
--------
a. Per-epoch training throughput at identical settings (batch 128, ZINB, 10 latent, 128
   hidden, 1 layer, dropout 0.1, train_size 0.9 on the *same* train/validation split,
   no early stopping, the full validation set evaluated after every epoch, no progress
   bars). Epochs are timed from inside the training loop; "fixed overhead" is the rest
   of the training call (checks, set-up, best-weights copy, for ours also the latent).
b. ``--end-to-end``: each tool with its defaults, call -> latent in ``obsm``; quality on
   the latent (kNN accuracy, ARI of Leiden vs labels, batch mixing) and the IWAE
   estimate of log p(x) (K=100) per held-out cell.
c. Inference: latent of all cells, IWAE (K=100) on 1000 cells, on the model of (a).
d. ``--pbmc``: (b) on ``sv.datasets.pbmc68k()`` (labels ``obs["bulk_labels"]``).

Without scvi-tools installed only the sc_vi_ext column is filled.

On a shared machine use ``--threads 1`` (or ``--omp-passive``): with 2 torch threads and other
load, OpenMP spin-waiting makes training 10-50x slower for both tools. Under load, trust the
"CPU seconds per epoch" row (with one thread it counts only this process's cycles) over wall time.
See benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
K_IWAE = 100


# --------------------------------------------------------------------------- helpers
def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover
        return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process since it started (MiB).

    VmHWM from /proc/self/status: the high-water mark of this program's address space. Not
    ru_maxrss, which on Linux carries the parent's RSS at fork into a child across exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def have_scvi() -> bool:
    import importlib.util

    return importlib.util.find_spec("scvi") is not None


def quiet():
    warnings.filterwarnings("ignore")
    import logging

    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def shared_split(n_obs: int, train_size: float, seed: int):
    """The train/validation split sc_vi_ext draws first inside ``tl.vae(random_state=seed)``."""
    try:
        from sc_vi_ext.tl._utils import split_indices
    except ImportError:  # a copy from before the cleanup (--ours-alt)
        from sc_vi_ext.tl._vae import split_indices

    return split_indices(n_obs, train_size, np.random.default_rng(seed))


# --------------------------------------------------------------------------- ours
def ours_train(adata, *, epoch_times: list | None = None, **kw):
    """``sv.tl.vae`` with a per-epoch timestamp recorded from inside the training loop."""
    import sc_vi_ext as sv
    from sc_vi_ext.tl import _vae

    orig = _vae.train

    def timed_train(*a, callback=None, **k):
        if epoch_times is not None:
            epoch_times.append((time.perf_counter(), time.process_time()))

        def cb(epoch, module):
            if epoch_times is not None:
                epoch_times.append((time.perf_counter(), time.process_time()))
            return callback(epoch, module) if callback is not None else None

        return orig(*a, callback=cb, **k)

    _vae.train = timed_train
    try:
        sv.tl.vae(adata, **kw)
    finally:
        _vae.train = orig


def ours_latent(adata, key="vae", batch_size=1024) -> np.ndarray:
    """Latent means of every cell from the stored model (what fills ``obsm``)."""
    import torch

    import sc_vi_ext as sv
    from sc_vi_ext.model_store import stored_loader

    module = sv.get_model(adata, key)
    out = np.empty((adata.n_obs, module.n_latent), dtype=np.float32)
    pos = 0
    with torch.inference_mode():
        for mb in stored_loader(adata, key, batch_size=batch_size):
            mean, _ = module.inference(mb.x, mb.batch)
            rep = module.representation(mean) if hasattr(module, "representation") else mean
            out[pos:pos + len(mb.idx)] = rep.numpy()
            pos += len(mb.idx)
    return out


def ours_iwae(adata, indices, *, key="vae", k=K_IWAE, batch_size=128, seed=0) -> np.ndarray:
    """Importance-weighted estimate of log p(x) per cell (nats), K samples from q(z | x).

    log p(x) ~= logsumexp_k [log p(x | z_k) + log p(z_k) - log q(z_k | x)] - log K,
    with the full likelihood (including -log x!), the same quantity as scvi-tools'
    ``get_marginal_ll`` (observed library size, so no library term).
    """
    import torch

    import sc_vi_ext as sv
    from sc_vi_ext.model_store import stored_loader
    from sc_vi_ext.module.distributions import log_normal, log_normal_std

    if hasattr(sv.tl, "log_likelihood"):  # the library's own IWAE (sv.tl.log_likelihood)
        indices = np.asarray(indices)
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[indices] = True
        sv.tl.log_likelihood(adata, key=key, n_samples=k, subset=mask, batch_size=batch_size,
                             random_state=seed, device="cpu", progress=False)
        return adata.obs[f"{key}_log_px"].to_numpy()[np.sort(indices)].astype(np.float64)
    module = sv.get_model(adata, key)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for mb in stored_loader(adata, key, np.asarray(indices), batch_size=batch_size):
            mean, log_var = module.inference(mb.x, mb.batch)
            eps = torch.randn((k, *mean.shape), generator=gen, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * log_var) * eps
            log_px = module.log_px_z(mb.x, module.generative(z, mb.batch, mb.log_library))
            lw = log_px + log_normal_std(z) - log_normal(z, mean, log_var)
            out.append((torch.logsumexp(lw, 0) - math.log(k)).numpy())
    return np.concatenate(out).astype(np.float64)


# --------------------------------------------------------------------------- scvi
def scvi_setup(adata, batch_key):
    import scvi

    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)


def scvi_timer():
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.starts, self.end = [], None

        def on_train_epoch_start(self, trainer, pl_module):
            self.starts.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, trainer, pl_module):
            self.end = (time.perf_counter(), time.process_time())

        def stamps(self) -> np.ndarray:
            return np.array(self.starts + [self.end])

        def epochs(self) -> list[float]:
            return list(np.diff(self.stamps()[:, 0]))

    return EpochTimer()


# --------------------------------------------------------------------------- workers
def _ours_kw(args) -> dict:
    """``compile=`` and ``n_threads=`` for ``tl.vae`` (releases before had neither): the same
    thread count as scvi-tools gets (torch's, set by --threads), not the load-aware default."""
    import inspect

    import torch

    import sc_vi_ext as sv

    if "compile" not in inspect.signature(sv.tl.vae).parameters:
        return {}
    return {"compile": {"auto": "auto", "true": True, "false": False}[args.ours_compile],
            "n_threads": torch.get_num_threads()}


def _alt_kw(args, tool: str) -> dict:
    """The ``--alt-kw`` settings of ``tl.vae`` for the "alt" column (none for the others)."""
    return json.loads(args.alt_kw) if tool == "alt" and args.alt_kw else {}


def worker(args) -> dict:
    """Run one task in this (sub)process and return a JSON-able dict."""
    quiet()
    import anndata as ad
    import torch
    import torch._dynamo  # noqa: F401  imported lazily by the first torch.optim.Adam (~1-2 s); scvi-tools
    # pays it at import time, so import it here for both tools: imports are outside every timer

    if args.threads:
        torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(args._data)
    batch_key = args._batch_key or None
    res = {"task": args._worker, "torch_threads": torch.get_num_threads(), "rss_after_load_mib": rss_mib(),
           "load_start": os.getloadavg()[0], "python": platform.python_version()}
    train_idx, val_idx = shared_split(adata.n_obs, 0.9, 0)
    split = {"datasplitter_kwargs": {"external_indexing": [train_idx, val_idx]}}
    tool, mode = args._worker.split("-")
    alt_kw = _alt_kw(args, tool)
    tool = "ours" if tool == "alt" else tool
    res["sc_vi_ext_file"] = __import__("sc_vi_ext").__file__

    if mode == "epochs":
        E = args.epochs
        if tool == "ours":
            stamps: list[float] = []
            t0 = time.perf_counter()
            ours_train(adata, epoch_times=stamps, **{
                "max_epochs": E, "batch_size": 128, "lr": 1e-3, "likelihood": "zinb", "early_stopping": False,
                "train_size": 0.9, "progress": False, "batch_key": batch_key, "random_state": 0,
                **_ours_kw(args), **alt_kw})
            total = time.perf_counter() - t0
            stamps = np.array(stamps)
        else:
            import scvi

            scvi_setup(adata, batch_key)
            m = scvi.model.SCVI(adata, n_latent=10, n_hidden=128, n_layers=1, gene_likelihood="zinb")
            timer = scvi_timer()
            t0 = time.perf_counter()
            m.train(max_epochs=E, batch_size=128, train_size=0.9, early_stopping=False,
                    check_val_every_n_epoch=1, accelerator="cpu", enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[timer], **split)
            total = time.perf_counter() - t0
            stamps = timer.stamps()
        epochs = list(np.diff(stamps[:, 0]))
        res["peak_rss_train_mib"] = peak_rss_mib()
        res.update(epoch_s=epochs, epoch_cpu_s=list(np.diff(stamps[:, 1])), train_call_s=total,
                   overhead_s=total - sum(epochs),
                   n_train=len(train_idx), n_val=len(val_idx))
        # c. inference on the model just trained
        sub = np.random.default_rng(1).choice(adata.n_obs, min(args.iwae_cells, adata.n_obs), replace=False)
        sub.sort()
        if tool == "ours":
            t0 = time.perf_counter()
            adata.obsm["X_lat"] = ours_latent(adata)
            res["latent_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ll = ours_iwae(adata, sub)
            res["iwae_s"] = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            adata.obsm["X_lat"] = m.get_latent_representation()
            res["latent_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ll = m.get_marginal_ll(indices=sub, n_mc_samples=K_IWAE, return_mean=False).numpy()
            res["iwae_s"] = time.perf_counter() - t0
        res["iwae_cells"] = len(sub)
        res["iwae_after_E"] = float(np.mean(ll))

    elif mode == "e2e":
        label_key = args._label_key
        if tool == "ours":
            import sc_vi_ext as sv

            t0, c0 = time.perf_counter(), time.process_time()
            # defaults (random_state=0), or with --alt-kw's settings for the "alt" column
            sv.tl.vae(adata, batch_key=batch_key, progress=False, **{**_ours_kw(args), **alt_kw})
            res["wall_s"], res["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            h = adata.uns["vae"]["history"]
            res.update(epochs=int(len(h["epoch"])), max_epochs=int(adata.uns["vae"]["params"]["max_epochs"]),
                       stopped_early=bool(adata.uns["vae"]["stopped_early"]),
                       best_epoch=int(adata.uns["vae"]["best_epoch"]))
            val = adata.obs_names.get_indexer(adata.uns["vae"]["validation_obs_names"])
            assert np.array_equal(np.sort(val), val_idx)
            latent = adata.obsm["X_vae"]
            peak_rss_train = peak_rss_mib()
            t0 = time.perf_counter()
            ll = ours_iwae(adata, val)
            res["iwae_s"] = time.perf_counter() - t0
        else:
            import scvi
            from scvi.model._utils import get_max_epochs_heuristic

            default_epochs = get_max_epochs_heuristic(adata.n_obs)
            cap = args.scvi_max_epochs
            kw = {} if not cap or cap >= default_epochs else {"max_epochs": cap}
            timer = scvi_timer()
            t0, c0 = time.perf_counter(), time.process_time()
            scvi_setup(adata, batch_key)
            m = scvi.model.SCVI(adata)
            m.train(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[timer], **split, **kw)
            adata.obsm["X_scVI"] = latent = m.get_latent_representation()
            res["wall_s"], res["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
            ep = timer.epochs()
            res.update(epochs=len(ep), max_epochs=default_epochs, capped=bool(kw), epoch_s=ep)
            if kw:  # extrapolate: measured wall + the missing epochs at the measured mean rate
                rate = float(np.mean(ep[1:] if len(ep) > 1 else ep))
                res["wall_extrapolated_s"] = res["wall_s"] + rate * (default_epochs - len(ep))
            peak_rss_train = peak_rss_mib()
            t0 = time.perf_counter()
            ll = m.get_marginal_ll(indices=val_idx, n_mc_samples=K_IWAE, return_mean=False).numpy()
            res["iwae_s"] = time.perf_counter() - t0
        res["peak_rss_train_mib"] = peak_rss_train
        res["iwae_heldout"] = float(np.mean(ll))
        res["n_heldout"] = len(val_idx)
        np.save(args._out + ".latent.npy", np.asarray(latent, dtype=np.float32))
        res["latent_file"] = args._out + ".latent.npy"
        res["label_key"] = label_key
    res["peak_rss_mib"] = peak_rss_mib()
    res["load_end"] = os.getloadavg()[0]
    return res


def run_worker(task, data, args, tmp, label_key=None, batch_key=None, scvi_cap=None) -> dict | None:
    out = os.path.join(tmp, f"{task}-{Path(data).stem}.json")
    python = args.scvi_python if task.startswith("scvi") and args.scvi_python else sys.executable
    cmd = [python, str(HERE), "--_worker", task, "--_data", data, "--_out", out,
           "--epochs", str(args.epochs), "--iwae-cells", str(args.iwae_cells),
           "--threads", str(args.threads), "--ours-compile", args.ours_compile, "--alt-kw", args.alt_kw,
           "--scvi-max-epochs", str(args.scvi_max_epochs if scvi_cap is None else scvi_cap)]
    if label_key:
        cmd += ["--_label_key", label_key]
    if batch_key:
        cmd += ["--_batch_key", batch_key]
    print(f"# running {task} on {Path(data).name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ)
    if task.startswith("alt-") and args.ours_alt:
        env["PYTHONPATH"] = os.pathsep.join([args.ours_alt] + [p for p in [env.get("PYTHONPATH")] if p])
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"# {task} FAILED (rc={proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
        return None
    res = json.loads(Path(out).read_text())
    print(f"#   done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return res


def r_n_train(runs) -> str:
    return next((str(vs[0]["n_train"]) for vs in runs.values() if vs), "?")


def quality(adata, latent: np.ndarray, label_key: str, batch_key: str | None) -> dict:
    """kNN accuracy, ARI(Leiden, labels), batch mixing of a latent; same code for both tools."""
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    from sc_vi_ext.metrics import batch_mixing, kmeans_scores, knn_accuracy

    labels = adata.obs[label_key].astype(str).to_numpy()
    b = adata[:, :0].copy()
    b.obsm["X_lat"] = latent
    # the kNN graph by exact search, then scanpy's UMAP connectivities (what sc.pp.neighbors
    # computes); done by hand because scanpy 1.11's sparse-kNN path fails on scipy >= 1.17
    try:
        from scanpy.neighbors._connectivity import umap as umap_connectivities
        from sklearn.neighbors import NearestNeighbors

        k = 15
        dist, ind = NearestNeighbors(n_neighbors=k).fit(latent).kneighbors(latent)
        conn = umap_connectivities(ind, dist, n_obs=len(latent), n_neighbors=k)
        sc.tl.leiden(b, adjacency=conn, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    except ImportError:
        sc.pp.neighbors(b, use_rep="X_lat", random_state=0)
        sc.tl.leiden(b, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    out = {
        "knn_acc": knn_accuracy(latent, labels),
        "ari": float(adjusted_rand_score(labels, b.obs["leiden"])),
        "n_leiden": int(b.obs["leiden"].nunique()),
    }
    out["kmeans_ari"], out["kmeans_nmi"] = kmeans_scores(latent, labels)
    out["mixing"] = batch_mixing(latent, adata.obs[batch_key]) if batch_key and batch_key in adata.obs else float("nan")
    return out


# --------------------------------------------------------------------------- table
def fmt(v, spec=".2f"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def ratio(a, b):
    if a is None or b is None or not a or not math.isfinite(a) or not math.isfinite(b):
        return "–"
    return f"{b / a:.2f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3, help="epochs for the throughput runs (a, c)")
    p.add_argument("--dispersion", type=float, default=None,
                   help="simulate(dispersion=); default: simulate's own (5.0)")
    p.add_argument("--mean-library", type=float, default=None,
                   help="simulate(mean_library=); default: simulate's own (1500: ~36%% non-zero at 20k x 2000)")
    p.add_argument("--n-markers", type=int, default=None, help="simulate(n_markers=); default: simulate's own (20)")
    p.add_argument("--type-sd", type=float, default=None, help="simulate(type_sd=); default: simulate's own (0.3)")
    p.add_argument("--batch", action="store_true", help='use batch_key="batch" for both tools')
    p.add_argument("--end-to-end", action="store_true", help="(b) defaults, quality and IWAE")
    p.add_argument("--pbmc", action="store_true", help="(d) end-to-end on sv.datasets.pbmc68k()")
    p.add_argument("--no-throughput", action="store_true", help="skip (a) and (c)")
    p.add_argument("--no-scvi", action="store_true", help="only our column")
    p.add_argument("--scvi-python", metavar="PYTHON",
                   help="interpreter of a venv with scvi-tools (and sc_vi_ext, for the shared metrics), e.g. "
                        "scvi-tools 1.5.1 on Python 3.12: python3.12 -m venv V && V/bin/pip install "
                        "scvi-tools==1.5.1 -e .")
    p.add_argument("--scvi-max-epochs", type=int, default=0,
                   help="cap scvi-tools' end-to-end epochs on the simulated data (0: its default, 400 epochs "
                        "up to 20k cells) and extrapolate its wall time; --pbmc always runs its defaults")
    p.add_argument("--iwae-cells", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1, help="throughput runs per tool, alternating")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the workers (0: default)")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE in the workers (avoids spin-waiting on a loaded machine)")
    p.add_argument("--ours-alt", metavar="PATH",
                   help="also run a modified copy of sc_vi_ext found at PATH (put first on PYTHONPATH) as a column")
    p.add_argument("--alt-kw", default="", metavar="JSON",
                   help='also run this code with these tl.vae settings as the "alt" column, e.g. '
                        '\'{"precision": "bfloat16"}\' (with --ours-alt: that copy with these settings)')
    p.add_argument("--ours-compile", choices=["auto", "true", "false"], default="auto",
                   help="sc_vi_ext's compile= (the fused likelihood; its compile time falls in epoch 1)")
    p.add_argument("--keep", metavar="DIR", help="keep the data, worker JSON and latents in DIR")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_data", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_label_key", default="cell_type", help=argparse.SUPPRESS)
    p.add_argument("--_batch_key", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        res = worker(args)
        Path(args._out).write_text(json.dumps(res))
        return

    quiet()

    import sc_vi_ext as sv

    tools = ["ours"] + (["alt"] if args.ours_alt or args.alt_kw else [])
    tools += ["scvi"] if (args.scvi_python or have_scvi()) and not args.no_scvi else []
    batch_key = "batch" if args.batch else None
    # rows: (metric, {tool: formatted value}, {ratio name: text}); a ratio is other / ours
    rows: list[tuple[str, dict, dict]] = []
    ratio_cols = [t for t in tools if t != "ours"]
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="svbench") as tmp:
        if args.keep:
            tmp = args.keep
            os.makedirs(tmp, exist_ok=True)
        sim_kw = {k: v for k, v in (("dispersion", args.dispersion), ("mean_library", args.mean_library),
                                                  ("n_markers", args.n_markers), ("type_sd", args.type_sd))
                  if v is not None}
        need_sim = not args.no_throughput or args.end_to_end
        data_desc = []
        if need_sim:
            t0 = time.perf_counter()
            adata = sv.datasets.simulate(args.n_cells, args.n_genes, n_batches=3, n_types=8, random_state=0,
                                         **sim_kw)
            nnz = adata.X.nnz / (adata.n_obs * adata.n_vars)
            sim_path = os.path.join(tmp, "sim.h5ad")
            adata.write_h5ad(sim_path)
            print(f"# simulated {adata.n_obs} x {adata.n_vars} in {time.perf_counter() - t0:.1f}s, "
                  f"{nnz:.1%} non-zero", file=sys.stderr)
            data_desc.append(f"simulate({args.n_cells}, {args.n_genes}, n_batches=3, n_types=8, "
                             + "".join(f"{k}={v}, " for k, v in sim_kw.items())
                             + f"random_state=0): {nnz:.1%} non-zero, "
                             f"mean total count {adata.X.sum() / adata.n_obs:.0f}")

        def add(metric, r, key, spec=".2f", better=None, show_ratio=False):
            val = {t: (r.get(t) or {}).get(key) for t in tools}
            rows.append((metric, {t: fmt(v, spec) for t, v in val.items()},
                         {t: ratio(val["ours"], val[t]) if show_ratio else "" for t in ratio_cols}))

        def section(title):
            rows.append((title, {t: "" for t in tools}, {t: "" for t in ratio_cols}))

        if not args.no_throughput:
            runs = {t: [] for t in tools}
            for _ in range(args.repeats):  # alternate the tools so that load drifts hit both
                for t in tools:
                    v = run_worker(f"{t}-epochs", sim_path, args, tmp, batch_key=batch_key)
                    if v:
                        runs[t].append(v)
            r = {}
            for t, vs in runs.items():
                if not vs:
                    r[t] = None
                    continue
                later = [e for v in vs for e in (v["epoch_s"][1:] or v["epoch_s"])]
                later_cpu = [e for v in vs for e in (v["epoch_cpu_s"][1:] or v["epoch_cpu_s"])]
                s_ep = float(np.median(later))
                r[t] = {
                    "s_per_epoch": s_ep, "min_s_per_epoch": float(np.min(later)),
                    "cpu_per_epoch": float(np.median(later_cpu)),
                    "epoch1_s": float(np.median([v["epoch_s"][0] for v in vs])),
                    "cells_per_s": vs[0]["n_train"] / s_ep,
                    "epochs_str": " ; ".join(" / ".join(f"{e:.1f}" for e in v["epoch_s"]) for v in vs),
                    "overhead_s": float(np.median([v["overhead_s"] for v in vs])),
                    "peak_rss_mib": float(np.max([v["peak_rss_mib"] for v in vs])),
                    "peak_rss_train_mib": float(np.max([v["peak_rss_train_mib"] for v in vs])),
                    "rss_after_load_mib": float(np.max([v["rss_after_load_mib"] for v in vs])),
                    "torch_threads": vs[0]["torch_threads"],
                    "latent_s": float(np.min([v["latent_s"] for v in vs])),
                    "iwae_s": float(np.min([v["iwae_s"] for v in vs])),
                    "iwae_after_E": vs[0]["iwae_after_E"],
                    "load": " ; ".join(f"{v['load_start']:.1f}->{v['load_end']:.1f}" for v in vs),
                }
            section(f"**a. training, {args.epochs} epochs x {args.repeats} repeat(s), batch 128, ZINB, "
                    f"batch_key={batch_key}, {r_n_train(runs)} training cells**")
            add("seconds per epoch (median of epochs 2..E, incl. validation)", r, "s_per_epoch", ".2f", show_ratio=True)
            add("fastest epoch (s)", r, "min_s_per_epoch", ".2f", show_ratio=True)
            add("CPU seconds per epoch (user+sys, all threads; median)", r, "cpu_per_epoch", ".2f", show_ratio=True)
            add("epoch 1 (s, median over repeats)", r, "epoch1_s", ".2f")
            add("all epoch times (s; repeats separated by ;)", r, "epochs_str", "")
            add("training cells / second (at the median epoch)", r, "cells_per_s", ".0f")
            add("fixed overhead of the training call (s)", r, "overhead_s", ".2f")
            add("RSS after imports + reading the data (MiB)", r, "rss_after_load_mib", ".0f")
            add("peak RSS up to the end of training (MiB)", r, "peak_rss_train_mib", ".0f")
            add("peak RSS incl. inference of c (MiB)", r, "peak_rss_mib", ".0f")
            add("torch threads", r, "torch_threads", "d")
            add("1-min load average, start->end of each run", r, "load", "")
            section("**c. inference (model of a; fastest repeat)**")
            add(f"latent of all {args.n_cells} cells into obsm (s)", r, "latent_s", ".2f", show_ratio=True)
            add(f"IWAE K={K_IWAE} on {args.iwae_cells} cells (s)", r, "iwae_s", ".2f", show_ratio=True)
            add(f"IWAE log p(x) per cell after {args.epochs} epochs (nats)", r, "iwae_after_E", ".1f")

        datasets = []
        if args.end_to_end:
            datasets.append(("simulated", sim_path, adata, "cell_type", batch_key or "batch", batch_key))
        if args.pbmc:
            pb = sv.datasets.pbmc68k()
            data_desc.append(f"sv.datasets.pbmc68k(): {pb.n_obs} x {pb.n_vars}, "
                             f"{pb.X.nnz / (pb.n_obs * pb.n_vars):.1%} non-zero")
            pb_path = os.path.join(tmp, "pbmc.h5ad")
            pb.write_h5ad(pb_path)
            datasets.append(("pbmc68k", pb_path, pb, "bulk_labels", None, None))
        for name, path, data, label_key, mix_key, bkey in datasets:
            # the epoch cap of scvi-tools applies to the simulated data only; PBMC is cheap at its defaults
            cap = None if name == "simulated" else 0
            r = {t: run_worker(f"{t}-e2e", path, args, tmp, label_key=label_key, batch_key=bkey, scvi_cap=cap)
                 for t in tools}
            for t, v in r.items():
                if v:
                    try:
                        v.update(quality(data, np.load(v["latent_file"]), label_key, mix_key))
                    except Exception as e:  # keep the timings even if a metric breaks
                        notes.append(f"{name}/{t}: quality metrics failed: {type(e).__name__}: {e}")
                    v["epochs_str"] = f"{v['epochs']} (max {v['max_epochs']})"
                    v["load"] = f"{v['load_start']:.1f}->{v['load_end']:.1f}"
                    if t == "scvi" and v.get("capped"):
                        v["epochs_str"] += " CAPPED"
                        notes.append(
                            f"{name}: scvi-tools was capped at {v['epochs']} of its default {v['max_epochs']} "
                            f"epochs; its wall time to defaults is extrapolated as measured wall + "
                            f"{v['max_epochs'] - v['epochs']} x mean epoch time; its quality columns "
                            f"are for the capped model.")
            section(f"**{'b' if name == 'simulated' else 'd'}. end-to-end defaults, {name} "
                    f"({data.n_obs} x {data.n_vars}), batch_key={bkey}**")
            add("wall time call -> latent in obsm (s)", r, "wall_s", ".1f", show_ratio=True)
            add("CPU time of that call (s)", r, "cpu_s", ".1f", show_ratio=True)
            if any(v and v.get("wall_extrapolated_s") for v in r.values()):
                for v in r.values():
                    if v and "wall_extrapolated_s" not in v:
                        v["wall_extrapolated_s"] = v["wall_s"]
                add("wall time extrapolated to default epochs (s)", r, "wall_extrapolated_s", ".0f", show_ratio=True)
            add("epochs run", r, "epochs_str", "")
            add(f"held-out IWAE log p(x) per cell (K={K_IWAE}, nats; higher is better)", r, "iwae_heldout", ".2f")
            add("IWAE time on the held-out cells (s)", r, "iwae_s", ".1f", show_ratio=True)
            add("held-out cells (same split for both)", r, "n_heldout", "d")
            add(f"kNN accuracy of {label_key} (5-fold, k=15)", r, "knn_acc", ".3f")
            add(f"ARI Leiden vs {label_key}", r, "ari", ".3f")
            add("Leiden clusters", r, "n_leiden", "d")
            add(f"k-means ARI vs {label_key} (as many clusters as labels)", r, "kmeans_ari", ".3f")
            add(f"k-means NMI vs {label_key}", r, "kmeans_nmi", ".3f")
            add(f"batch mixing of {mix_key} (1 = fully mixed)" if mix_key else "batch mixing (no batch column)",
                r, "mixing", ".3f")
            add("peak RSS up to the latent (MiB)", r, "peak_rss_train_mib", ".0f")
            add("peak RSS incl. IWAE (MiB)", r, "peak_rss_mib", ".0f")
            add("1-min load average, start->end", r, "load", "")

    m = machine()
    if args.threads:
        m["torch_threads"] = args.threads
    if args.omp_passive:
        m["torch_threads"] = f"{m['torch_threads']} (OMP_WAIT_POLICY=PASSIVE)"
    try:
        rev = subprocess.run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    import scanpy

    pkgs = f"sc_vi_ext {sv.__version__} (git {rev or '?'}), scanpy {scanpy.__version__}"
    if "scvi" in tools:
        probe = ("import importlib.metadata as md, platform, torch; print(f\"scvi-tools {md.version('scvi-tools')}, "
                 "lightning {md.version('lightning')}, torch {torch.__version__} on Python {platform.python_version()}\")")
        pkgs += ", " + subprocess.run([args.scvi_python or sys.executable, "-c", probe], capture_output=True,
                                      text=True).stdout.strip()
    lines = [
        f"Packages: {pkgs}",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, torch.get_num_threads()={m['torch_threads']}, "
        f"Python {m['python']}; {m['date']}",
        f"Data: {'; '.join(data_desc)}",
        "Command: python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "",
    ]
    names = {"ours": "sc_vi_ext", "scvi": "scvi-tools",
             "alt": " ".join(x for x in ("sc_vi_ext", args.ours_alt and f"@ {args.ours_alt}", args.alt_kw) if x)}
    head = ["metric"] + [names[t] for t in tools]
    head += [f"{'alt' if t == 'alt' else 'scvi'} / ours (time)" for t in ratio_cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, vals, rats in rows:
        lines.append("| " + " | ".join([metric] + [vals[t] for t in tools] + [rats[t] for t in ratio_cols]) + " |")
    if ratio_cols:
        notes.insert(0, "ratio columns are the other column's value / sc_vi_ext's (times: > 1 means sc_vi_ext "
                        "is faster).")
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
