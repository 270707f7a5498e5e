"""Training speed against scvi-tools: per epoch at identical settings, and end to end with defaults.

    python -m benchmarks speed --scvi-python .venv-bench/bin/python            # the tables
    python -m benchmarks speed --quick                                              # seconds

Data: ``sv.datasets.simulate(n_cells, n_genes, n_batches=3, n_types=8)``, written once to a
temporary h5ad file; every run is its own process (its peak RSS is its own), the tools
alternate over ``--repeats`` pairs and the table gives the median of the per-pair ratios.

a. Per epoch at identical settings: batch 128, ZINB, 10 latent, 128 hidden, 1 layer, lr 1e-3,
   the same 90/10 split, no early stopping, the validation set scored every epoch, ``--threads``
   torch threads for both; seconds per epoch are the median of epochs 2..E, timed inside the
   training loop. sc_vi_ext runs at its default fast path (float32) and, where the CPU has
   bfloat16 instructions, with ``precision="bfloat16"``.
b. End to end with each tool's defaults (``tl.vae`` vs ``SCVI().train()``), call -> latent:
   scvi-tools runs ``--scvi-epochs`` of its default epochs and its time is extrapolated to all
   of them (measured + missing epochs at its mean epoch time). Quality against the peer at its
   full defaults is the ``quality`` scenario.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._common import (
    SCVI_VENV_HELP,
    fmt,
    ours_first,
    parser,
    peak_rss_mib,
    peer_versions,
    quiet,
    run_worker,
    save,
    shared_split,
    table,
    uptime,
)

SETTINGS = {"batch_size": 128, "lr": 1e-3, "likelihood": "zinb", "n_latent": 10, "n_hidden": 128, "n_layers": 1}


# --------------------------------------------------------------------------- workers (one process each)
def _ours(adata, cfg: dict) -> dict:
    import sc_vi_ext as sv
    from sc_vi_ext.tl import _vae

    stamps: list[float] = []
    orig = _vae.train

    def timed(*a, callback=None, **k):  # a time stamp at the start and after every epoch
        stamps.append(time.perf_counter())

        def cb(epoch, module):
            stamps.append(time.perf_counter())
            return None if callback is None else callback(epoch, module)

        return orig(*a, callback=cb, **k)

    _vae.train = timed
    kw = {"batch_key": "batch", "progress": False, "random_state": 0, "n_threads": cfg["threads"] or None}
    if cfg["mode"] == "epochs":
        kw.update(SETTINGS, max_epochs=cfg["epochs"], early_stopping=False, train_size=0.9,
                  precision=cfg.get("precision", "float32"))
    t0 = time.perf_counter()
    try:
        sv.tl.vae(adata, **kw)
    finally:
        _vae.train = orig
    return {"wall_s": time.perf_counter() - t0, "epoch_s": list(np.diff(stamps)),
            "epochs": len(adata.uns["vae"]["history"]["epoch"]), "max_epochs": adata.uns["vae"]["params"]["max_epochs"],
            "precision": adata.uns["vae"]["params"]["precision"]}


def _scvi(adata, cfg: dict) -> dict:
    import scvi
    from lightning.pytorch.callbacks import Callback

    class Stamps(Callback):
        def __init__(self):
            self.t = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.t.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.t.append(time.perf_counter())

    from scvi.model._utils import get_max_epochs_heuristic

    scvi.settings.seed = 0
    tr, va = shared_split(adata.n_obs)
    kw = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
          "datasplitter_kwargs": {"external_indexing": [tr, va]}}
    default_epochs = get_max_epochs_heuristic(adata.n_obs)
    stamps = Stamps()
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    if cfg["mode"] == "epochs":
        m = scvi.model.SCVI(adata, n_latent=10, n_hidden=128, n_layers=1, gene_likelihood="zinb")
        m.train(max_epochs=cfg["epochs"], batch_size=128, plan_kwargs={"lr": 1e-3}, train_size=0.9,
                early_stopping=False, check_val_every_n_epoch=1, callbacks=[stamps], **kw)
    else:
        m = scvi.model.SCVI(adata)
        m.train(max_epochs=min(cfg["epochs"], default_epochs), callbacks=[stamps], **kw)
    m.get_latent_representation()
    return {"wall_s": time.perf_counter() - t0, "epoch_s": list(np.diff(stamps.t)), "epochs": len(stamps.t) - 1,
            "max_epochs": default_epochs}


def worker(args) -> None:
    quiet()
    if args._worker == "ours":
        ours_first()
    import anndata as ad
    import torch
    import torch._dynamo  # noqa: F401 - scvi-tools imports it at start-up; import it for both, outside the timers

    cfg = json.loads(args._cfg)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    adata = ad.read_h5ad(args._data)
    res = (_ours if args._worker == "ours" else _scvi)(adata, cfg)
    res.update(peak_rss_mib=peak_rss_mib(), threads=torch.get_num_threads())
    Path(args._out).write_text(json.dumps(res))


# --------------------------------------------------------------------------- the scenario
def _per_epoch(res: dict) -> float:
    later = res["epoch_s"][1:] or res["epoch_s"]
    return float(np.median(later))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__ + SCVI_VENV_HELP)
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4, help="epochs of each per-epoch run (a)")
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs, the tools alternating")
    p.add_argument("--threads", type=int, default=2, help="torch threads of both tools (0: each tool's default)")
    p.add_argument("--scvi-epochs", type=int, default=5, help="epochs scvi-tools runs in (b), then extrapolated")
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 column")
    p.add_argument("--no-e2e", action="store_true", help="skip (b)")
    args = p.parse_known_args(argv)[0]
    if args._worker:
        return worker(args)
    if args.quick:
        args.n_cells, args.n_genes, args.epochs, args.repeats, args.scvi_epochs = 2000, 300, 2, 1, 2
    started = uptime()
    quiet()
    import sc_vi_ext as sv
    from sc_vi_ext.acceleration import bf16_fast_on_cpu

    tools = ["ours"] + (["ours-bf16"] if bf16_fast_on_cpu() and not args.no_bf16 else [])
    tools += ["scvi"] if args.scvi_python else []
    names = {"ours": "sc_vi_ext", "ours-bf16": "sc_vi_ext bfloat16", "scvi": "scvi-tools"}
    if not args.scvi_python:
        print("# no --scvi-python: only sc_vi_ext is measured", file=sys.stderr)
    raw: dict = {"epochs": {t: [] for t in tools}, "e2e": {}}
    with tempfile.TemporaryDirectory(prefix="svbench") as tmp:
        adata = sv.datasets.simulate(args.n_cells, args.n_genes, n_batches=3, n_types=8, random_state=0)
        data = Path(tmp) / "sim.h5ad"
        adata.write_h5ad(data)
        desc = (f"simulate({args.n_cells}, {args.n_genes}, n_batches=3, n_types=8): "
                f"{adata.X.nnz / (adata.n_obs * adata.n_vars):.1%} non-zero")

        def run(tool: str, cfg: dict, i: int) -> dict | None:
            python = args.scvi_python if tool == "scvi" else sys.executable
            cfg = {"threads": args.threads, **cfg, **({"precision": "bfloat16"} if tool == "ours-bf16" else {})}
            return run_worker("speed", python, ["--_worker", tool.split("-")[0], "--_data", str(data),
                                                "--_cfg", json.dumps(cfg)], Path(tmp) / f"{tool}-{i}.json")

        for i in range(args.repeats):
            for t in tools:
                r = run(t, {"mode": "epochs", "epochs": args.epochs}, i)
                if r:
                    raw["epochs"][t].append(r)
        if not args.no_e2e:
            for t in [t for t in tools if t != "ours-bf16"]:
                raw["e2e"][t] = run(t, {"mode": "e2e", "epochs": args.scvi_epochs}, 0)
    tables = [_epoch_table(raw["epochs"], tools, names, args, len(shared_split(args.n_cells)[0]))]
    if raw["e2e"]:
        tables.append(_e2e_table(raw["e2e"], names))
    save("speed", argv=argv if argv is not None else sys.argv[2:], quick=args.quick, tables=tables, started=started,
         data=desc, raw=raw, versions=peer_versions(args.scvi_python) if args.scvi_python else "")


def _epoch_table(runs: dict, tools: list, names: dict, args, n_train: int) -> dict:
    rows, notes = [], []
    ours = [_per_epoch(r) for r in runs["ours"]]
    for t in tools:
        per = [_per_epoch(r) for r in runs[t]]
        if not per:
            rows.append([names[t], "failed", "", "", "", ""])
            continue
        pairs = [b / a for a, b in zip(ours, per, strict=False)] if t != "ours" else []
        ratio = statistics.median(a / b for a, b in zip(per, ours, strict=False)) if t != "ours" else 1.0
        rows.append([names[t], fmt(statistics.median(per)), " / ".join(fmt(v) for v in per),
                     fmt(n_train / statistics.median(per), ".0f"), f"{ratio:.2f}×",
                     fmt(max(r["peak_rss_mib"] for r in runs[t]), ".0f")])
        if pairs:
            notes.append(f"{names[t]} / sc_vi_ext per pair: " + ", ".join(f"{v:.2f}" for v in pairs))
    return table(f"a. Seconds per epoch, identical settings ({args.threads or 'default'} threads, "
                 f"{args.epochs} epochs × {args.repeats} pairs, batch 128, ZINB, lr 1e-3, 3 batches)",
                 ["tool", "s / epoch (median)", "per run", "training cells / s", "its time / sc_vi_ext's",
                  "peak RSS MiB"], rows, ["The ratio column is the median over pairs of the tool's epoch time "
                                          "over sc_vi_ext's (float32): > 1 means sc_vi_ext is faster.", *notes])


def _e2e_table(res: dict, names: dict) -> dict:
    rows, ours = [], res.get("ours")
    for t, r in res.items():
        if not r:
            rows.append([names[t], "failed", "", "", ""])
            continue
        est = r["wall_s"]
        if t == "scvi" and r["epochs"] < r["max_epochs"]:
            later = r["epoch_s"][1:] or r["epoch_s"]
            est += float(np.mean(later)) * (r["max_epochs"] - r["epochs"])
        r["wall_to_defaults_s"] = est
        ratio = f"{est / ours['wall_to_defaults_s']:.1f}×" if ours and t != "ours" else "1.0×"
        name = names[t] + (f" ({r['precision']})" if "precision" in r else "")
        rows.append([name, f"{r['epochs']} of {r['max_epochs']}", fmt(r["wall_s"], ".1f"), fmt(est, ".0f"), ratio])
    return table("b. End to end with each tool's defaults (call -> latent)",
                 ["tool", "epochs run (of default)", "measured s", "s to its defaults", "its time / sc_vi_ext's"],
                 rows, ["sc_vi_ext stops early by its default rule; scvi-tools' time to its default epochs is "
                        "measured + missing epochs × its mean epoch time (epochs 2..)."])


if __name__ == "__main__":
    main()
