"""Command line: ``sc-vi-ext demo`` (end to end on the bundled PBMC data) and ``sc-vi-ext train``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_files import CommandError, check_input, check_output, read_input, write_adata, write_atomic


def _demo_figures(adata, out: Path, *, with_gap: bool) -> list[str]:
    """Write the demo's figures into ``out``; return their file names."""
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    import sc_vi_ext as sv

    figs = {}
    figs["elbo.png"] = sv.pl.elbo(adata, return_fig=True)
    figs["latent_umap.png"] = sv.pl.latent(adata, color=["bulk_labels", "leiden"], wspace=0.55, return_fig=True)
    if with_gap:
        figs["amortization_gap.png"] = sv.pl.amortization_gap(adata, groupby="bulk_labels", return_fig=True)
        # the flag reads at a glance; the trust score itself is uniform over typical training cells
        flagged = adata.copy()
        flagged.obs["trust"] = pd.Categorical(np.where(adata.obs["vae_untrusted"], "untrusted", "trusted"),
                                              categories=["trusted", "untrusted"])
        flagged.uns["trust_colors"] = ["#d9d9d9", "#d62728"]
        fig = sv.pl.latent(flagged, color="trust", return_fig=True,
                           title="Cells flagged by tl.trust_score (gap > median + 3 robust s.d.\n"
                                 "of the training cells of similar library size)")
        figs["latent_trust.png"] = fig
    for name, fig in figs.items():
        write_atomic(lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, bbox_inches="tight"), out / name)
        plt.close(fig)
    return list(figs)


def _demo_summary(adata, written: list[str], out: Path) -> None:
    """Print what the demo found: epochs, ELBO, kNN accuracy against PCA's, gaps and trust."""
    import scanpy as sc

    from .metrics import knn_accuracy

    h = adata.uns["vae"]["history"]
    best = adata.uns["vae"]["best_epoch"] - 1
    acc_vae = knn_accuracy(adata.obsm["X_vae"], adata.obs["bulk_labels"])
    pca = adata.copy()
    sc.pp.normalize_total(pca, target_sum=1e4)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=10, random_state=0)
    acc_pca = knn_accuracy(pca.obsm["X_pca"], pca.obs["bulk_labels"])
    names = {"train": "training cells", "validation": "held-out cells"}

    def row(label: str, text: str) -> None:  # one aligned line of the summary
        print(f"  {label:24s}{text}")

    print("\nsummary")
    row("epochs run", f"{len(h['epoch'])} (best {best + 1})")
    row("ELBO validation", f"{h['elbo_validation'][best]:.1f} nats/cell")
    row("kNN label accuracy", f"VAE {acc_vae:.3f}  |  PCA (10 PCs of log-normalised) {acc_pca:.3f}")
    row("leiden clusters", f"{adata.obs['leiden'].nunique()}")
    for split, res in adata.uns["vae"].get("amortization_gap", {}).items():
        if split in names:
            row(f"gaps, {names[split]}",
                f"amortization {res['amortization_gap_mean']:.2f} ± {res['amortization_gap_se']:.2f}, "
                f"approximation {res['approximation_gap_mean']:.2f} ± {res['approximation_gap_se']:.2f} "
                f"nats/cell (n={res['n_cells']})")
    for split, res in adata.uns["vae"].get("trust", {}).items():
        if split in names:
            row(f"trust, {names[split]}", f"median {res['trust_median']:.2f}, flagged untrusted "
                f"{100 * res['frac_untrusted']:.1f}% (n={res['n_cells']})")
    row("wrote", f"{', '.join(sorted(written))} in {out}/")


def _demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    import sc_vi_ext as sv

    sc.settings.verbosity = 3
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; name a folder for the demo's outputs")
    out.mkdir(parents=True, exist_ok=True)
    check_output(str(out / "pbmc68k_vae.h5ad"))  # writable, before the work
    adata = sv.datasets.pbmc68k()
    print(f"PBMC data: {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs['bulk_labels'].nunique()} cell types")
    sv.tl.vae(adata, layer="counts", max_epochs=args.max_epochs, progress=not args.quiet)
    if not args.no_gap:
        # before the kNN graph: sc.pp.neighbors leaves torch with one thread per core, which on a
        # busy machine slows the diagnostics several-fold
        sv.tl.amortization_gap(adata, n_cells=args.gap_cells, progress=not args.quiet)
        sv.tl.trust_score(adata, progress=not args.quiet)
    sc.pp.neighbors(adata, use_rep="X_vae")
    sc.tl.umap(adata, random_state=0)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    figs = _demo_figures(adata, out, with_gap=not args.no_gap)
    write_adata(adata, out / "pbmc68k_vae.h5ad", "h5ad")
    _demo_summary(adata, [*figs, "pbmc68k_vae.h5ad"], out)
    return 0


def _train(args) -> int:
    import scanpy as sc

    import sc_vi_ext as sv

    from .distributed import defer_sigint, init_from_env, last_signal_name, rank_and_world, sigterm_as_ctrl_c

    # both files checked before any work: a bad path costs one line, not a training run
    in_format, out_format = check_input(args.input, backed=args.backed), check_output(args.output)
    # under torchrun, Ctrl-C or SIGTERM stops training on every rank at the same step, then
    # rank 0 still writes the result and the others exit (see sc_vi_ext/distributed.py); in
    # one process SIGTERM (a scheduler's time limit) stops training as Ctrl-C does
    restore_sigint, restore_sigterm = defer_sigint(), sigterm_as_ctrl_c()
    init_from_env()  # under torchrun: join the process group (gloo on CPU, NCCL on GPUs)
    rank, world = rank_and_world()
    sc.settings.verbosity = 3 if rank == 0 else 0
    adata = read_input(args.input, in_format, backed=args.backed)
    sv.tl.vae(
        adata, layer=args.layer, use_raw=args.use_raw, batch_key=args.batch_key, n_latent=args.n_latent,
        likelihood=args.likelihood, max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr,
        early_stopping=not args.no_early_stopping, early_stopping_patience=args.early_stopping_patience,
        random_state=args.random_state, key_added=args.key_added, device=args.device, progress=not args.quiet,
        n_threads=args.n_threads, compile={"auto": "auto", "on": True, "off": False}[args.compile],
        precision=args.precision,
    )
    restore_sigterm()
    if rank == 0:  # every rank holds the same model; one writes
        if args.backed:
            from .dataloader import check_length

            try:
                backed, adata = adata, adata.to_memory()
                check_length(backed.X)  # HDF5 reads the lost end of a truncated file as zeros
            except (OSError, KeyError, RuntimeError) as e:  # the file was damaged during training
                raise CommandError(f"input {args.input} is damaged: could not read it back ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())}); nothing was written") from None
        restore_writing = defer_sigint(always=True)  # a signal now waits for the write (the grace period)
        try:
            write_adata(adata, args.output, out_format)
        finally:
            restore_writing()
        interrupted = (f" after {last_signal_name()}, best weights so far"
                       if adata.uns.get(args.key_added, {}).get("interrupted") else "")
        print(f"wrote {args.output}" + (f" (trained on {world} processes)" if world > 1 else "") + interrupted,
              flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    restore_sigint()
    return 0


DESCRIPTION = """Amortized variational inference for single-cell counts (sc_vi_ext).

  sc-vi-ext demo               train on the bundled PBMC data; write the h5ad and figures
  sc-vi-ext train IN OUT       train the VAE on any h5ad file of raw counts and write the result

Under torchrun, `train` trains data-parallel (one process per GPU or CPU group).
Run `sc-vi-ext COMMAND --help` for the options of a command.
"""

EPOCH_RULE = ("epoch budget; auto: min(400, max(20, round(2e6 / n_cells))), about two million cell "
              "passes (400 epochs up to 5,000 cells, 20 from 100,000); early stopping usually ends sooner")


def _epochs(value: str) -> int | None:
    """``--max-epochs``: a number of epochs, or "auto" for the rule above."""
    return None if value == "auto" else int(value)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every argument's help; descriptions printed as written."""


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of ``sc-vi-ext`` with its ``demo`` and ``train`` commands."""
    from .acceleration import COMPILE_MIN_STEPS, PRECISIONS
    from .module.vae import DEFAULTS, LIKELIHOODS
    from .train import TRAINING_DEFAULTS

    parser = argparse.ArgumentParser(prog="sc-vi-ext", description=DESCRIPTION, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="train on the bundled PBMC data; write the h5ad and figures",
                       description="Train on the bundled 700 PBMCs, run neighbors/UMAP/leiden and the gap\n"
                                   "diagnostics, and write pbmc68k_vae.h5ad and the figures to --out.",
                       formatter_class=_Formatter)
    d.add_argument("--out", default="sc_vi_ext_demo", help="output folder")
    d.add_argument("--max-epochs", type=_epochs, default="auto", help=EPOCH_RULE)
    d.add_argument("--gap-cells", type=int, default=None,
                   help="cells for the amortization-gap diagnostics (None: all)")
    d.add_argument("--no-gap", action="store_true", help="skip the amortization-gap diagnostics")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    t = sub.add_parser("train", help="train the VAE on an h5ad file and write the result",
                       description="Train the VAE (sv.tl.vae) on the raw counts of IN and write IN with the\n"
                                   "latent space (obsm['X_<key>']) and the model (uns['<key>']) to OUT.",
                       formatter_class=_Formatter)
    t.add_argument("input", help="h5ad file (or .zarr store) with raw counts")
    t.add_argument("output", help="h5ad file (or .zarr store) to write; written to a temporary file and renamed "
                                  "over OUT when complete, so a failed write leaves OUT as it was")
    t.add_argument("--layer", default=None, help="layer with raw counts; adata.X when not given")
    t.add_argument("--use-raw", action="store_true",
                   help="train on the raw counts in adata.raw (X normalised, as in CELLxGENE files)")
    t.add_argument("--batch-key", default=None, help="column of obs with batch labels; no batch when not given")
    t.add_argument("--n-latent", type=int, default=DEFAULTS["n_latent"], help="dimension of the latent space")
    t.add_argument("--likelihood", default=DEFAULTS["likelihood"], choices=list(LIKELIHOODS), help="count likelihood")
    t.add_argument("--max-epochs", type=_epochs, default="auto", help=EPOCH_RULE)
    t.add_argument("--no-early-stopping", action="store_true",
                   help="run every epoch of the budget instead of stopping on the validation ELBO")
    t.add_argument("--early-stopping-patience", type=int, default=TRAINING_DEFAULTS["early_stopping_patience"],
                   help="epochs without improvement of the validation ELBO before stopping")
    t.add_argument("--batch-size", type=int, default=TRAINING_DEFAULTS["batch_size"], help="cells per minibatch")
    t.add_argument("--lr", type=float, default=TRAINING_DEFAULTS["lr"], help="Adam learning rate")
    t.add_argument("--random-state", type=int, default=0,
                   help="seed; the same seed, machine, torch version and --n-threads give identical results")
    t.add_argument("--n-threads", type=int, default=None,
                   help="CPU threads for torch during training; when not given, torch's default reduced to the "
                        "cores that are idle at the start")
    t.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="fuse the likelihood with torch.compile instead of the fused kernel; auto: only where "
                        f"the kernel does not apply, for runs of at least {COMPILE_MIN_STEPS:,} optimiser steps")
    t.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="bfloat16: matrix products of the training steps in bfloat16 (CPUs with AVX-512 BF16 "
                        "or AMX, GPUs); auto: bfloat16 where the hardware has it, else float32")
    t.add_argument("--device", default="auto", help='torch device; "auto" picks CUDA when available, else CPU')
    t.add_argument("--key-added", default="vae", help="name of the result (obsm['X_<key>'], uns['<key>'])")
    t.add_argument("--backed", action="store_true", help="read the input with backed='r' (out of core)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sc-vi-ext`` and ``python -m sc_vi_ext``."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as e:
        print(f"sc-vi-ext {args.command}: error: {e}", file=sys.stderr, flush=True)
        return e.status
    except RuntimeError as e:  # under torchrun: another rank died, this one's collective failed or timed out
        from .distributed import rank_and_world

        rank, world = rank_and_world()
        if world <= 1:
            raise
        first = " ".join(str(e).split())[:200]
        print(f"sc-vi-ext {args.command}: error: rank {rank} lost the other ranks ({type(e).__name__}: {first}): "
              "a worker died (torchrun's summary names it); OUT was not written", file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # a backed input that became unreadable during the run
        from .dataloader import DamagedFileError

        if not isinstance(e, DamagedFileError):
            raise
        print(f"sc-vi-ext {args.command}: error: {e} (nothing was written)", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:  # before the first epoch (nothing to keep), or while reading
        from .distributed import last_signal_name

        print(f"sc-vi-ext {args.command}: interrupted ({last_signal_name()}): "
              f"{e or 'nothing was written'}", file=sys.stderr, flush=True)
        return 130 if last_signal_name() == "Ctrl-C" else 143


if __name__ == "__main__":
    sys.exit(main())
