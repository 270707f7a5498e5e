"""Speed of ``tl.amortization_gap``: the L-BFGS/SAA optimiser of q* against the earlier Adam code.

Both run on the same trained model and the same cells (every cell), one after the other:

- old: q* by stochastic Adam (``optimize_q(method="adam")``, the earlier defaults: 8 draws
  per step, lr 0.02, windows of 20 steps, patience 3, at most 500 steps), then L[q] and
  L[q*] with 256 common random numbers and log p(x) by IWAE with K = 1,000 (mixture of q and
  q*), as ``tl.amortization_gap`` did before issue 12;
- new: ``tl.amortization_gap`` with its defaults (q* by L-BFGS on a sample-average
  approximation, then one pass of importance sampling for log p(x), L[q] and L[q*]; K = 500
  paired draws until round 3, 128 draws from q, q* and a widened q* since round 4).

It prints CPU time (``time.process_time``; with OMP_NUM_THREADS=1 this is close to the work
done, whatever else the machine runs) and wall time, the machine's load before and after,
and per split (training / held-out cells) the mean of every bound and gap with its standard
error over cells, for both; then whether each new mean is within the combined standard
errors of the old one, and the paired per-cell differences.

    OMP_NUM_THREADS=1 python benchmarks/gap_speed.py                 # both data sets
    OMP_NUM_THREADS=1 python benchmarks/gap_speed.py --data pbmc --n-cells 256   # quick look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sc_vi_ext as sv  # noqa: E402
from sc_vi_ext.diagnostics import COLUMNS, elbo_paired, iwae, optimize_q, summarize  # noqa: E402
from sc_vi_ext.model_store import held_out_mask, stored_loader  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def old_decompose(module, mb, gen) -> dict[str, np.ndarray]:
    """The pre-issue-12 decomposition: Adam q*, 256 CRN draws for the ELBOs, IWAE K = 1,000."""
    with torch.no_grad():
        q = module.inference(mb.x, mb.batch, mb.cov)
    qs = optimize_q(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, generator=gen, method="adam",
                    n_samples_step=8, lr=0.02, max_steps=500, window=20, patience=3, tol=0.01)
    (l_q, rq), (l_o, ro) = elbo_paired(module, mb.x, mb.batch, mb.log_library, [q, (qs.mean, qs.log_var)],
                                       n_samples=256, generator=gen, cov=mb.cov)
    lpx, _, se_lpx = iwae(module, mb.x, mb.batch, mb.log_library, *q, n_samples=1000, generator=gen, cov=mb.cov,
                          also=(qs.mean, qs.log_var))
    out = {"elbo": l_q, "elbo_opt": l_o, "log_px": lpx, "amortization_gap": l_o - l_q, "approximation_gap": lpx - l_o,
           "amortization_gap_se": (ro - rq).std(0) / 16,
           "approximation_gap_se": torch.sqrt(se_lpx**2 + ro.var(0) / 256),
           "displacement": torch.zeros_like(l_q), "opt_steps": qs.n_steps.double()}
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in out.items()}


def run_old(adata, idx) -> tuple[dict, float, float]:
    module = sv.get_model(adata)
    gen = torch.Generator().manual_seed(0)
    c0, w0 = time.process_time(), time.perf_counter()
    parts = [old_decompose(module, mb, gen) for mb in stored_loader(adata, "vae", idx, batch_size=128)]
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, cpu, wall


def run_new(adata, idx) -> tuple[dict, float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = sv.tl.amortization_gap(adata, n_cells=None, progress=False, copy=True)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    obs = out.obs.iloc[idx]
    per = {c: obs[f"vae_{c}"].to_numpy() for c in (*COLUMNS, "amortization_gap_se", "approximation_gap_se")}
    per["displacement"] = np.zeros(len(idx))
    return per, cpu, wall


def compare(name: str, adata) -> None:
    idx = np.arange(adata.n_obs)
    val = held_out_mask(adata, "vae")
    print(f"\n== {name}: {adata.n_obs} cells x {adata.n_vars} genes ({val.sum()} held out)")
    print(f"uptime before: {uptime()}")
    old, c_old, w_old = run_old(adata, idx)
    new, c_new, w_new = run_new(adata, idx)
    print(f"uptime after:  {uptime()}")
    print(f"old (Adam q*, K=1000 + 2x256): CPU {c_old:7.1f} s, wall {w_old:7.1f} s, "
          f"{old['opt_steps'].mean():.0f} steps per cell (max {old['opt_steps'].max():.0f})")
    print(f"new (tl.amortization_gap):     CPU {c_new:7.1f} s, wall {w_new:7.1f} s")
    print(f"speed-up: {c_old / c_new:.1f}x CPU time, {w_old / w_new:.1f}x wall time")
    for split, m in (("training", ~val), ("held-out", val)):
        if m.sum() < 2:
            continue
        so = summarize({k: v[m] for k, v in old.items()})
        sn = summarize({k: v[m] for k, v in new.items()})
        print(f"  {split} cells (n={m.sum()}):   old mean ± s.e.   new mean ± s.e.   |diff| / combined s.e.")
        for c in COLUMNS:
            d = abs(sn[f"{c}_mean"] - so[f"{c}_mean"]) / np.hypot(sn[f"{c}_se"], so[f"{c}_se"])
            print(f"    {c:18s} {so[f'{c}_mean']:9.3f} ± {so[f'{c}_se']:.3f}  {sn[f'{c}_mean']:9.3f} ± "
                  f"{sn[f'{c}_se']:.3f}   {d:4.2f} {'ok' if d < 2 else 'DIFFERENT'}")
        for c in ("amortization_gap", "approximation_gap"):
            diff = new[c][m] - old[c][m]
            print(f"    paired per-cell new - old, {c}: mean {diff.mean():+.3f}, sd {diff.std():.3f}, "
                  f"median cell s.e. {np.median(new[c + '_se'][m]):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["simulated", "pbmc"], choices=["simulated", "pbmc"])
    ap.add_argument("--n-cells", type=int, default=None, help="first N cells only (a quick look)")
    ap.add_argument("--max-epochs", type=int, default=None, help="training epochs (default: tl.vae's)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in args.data:
        if name == "simulated":
            adata = sv.datasets.simulate(1000, 2000, random_state=0)
            sv.tl.vae(adata, batch_key="batch", max_epochs=args.max_epochs, progress=False)
        else:
            adata = sv.datasets.pbmc68k()
            sv.tl.vae(adata, layer="counts", max_epochs=args.max_epochs, progress=False)
        if args.n_cells:
            adata = adata[: args.n_cells].copy()  # held-out cells are stored by name
        compare(name, adata)


if __name__ == "__main__":
    main()
