"""The ZINB likelihood of one training minibatch, forward + backward: previous release vs now.

    python benchmarks/likelihood_kernels.py            # 1 thread, 128 x 2,000, simulated counts

Variants, each timed by CPU time over ``--reps`` forward + backward passes (log-softmax of the
decoder output included, as in training):

* ``previous``: the likelihood of the previous release (git 13149aa): lgamma / digamma on
  every non-zero, dense terms with ``torch.where`` over ``softplus`` / ``logaddexp``;
* ``table + eager``: gamma terms by per-gene table (``sc_vi_ext.module.fused``), dense terms
  eager;
* ``table + compiled``: the same with the dense terms fused by ``torch.compile``;
* ``log-softmax only``: the floor that is not the likelihood's.

It also checks that the three give the same values. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def previous_log_zinb(x, log_mu, theta, zi, nz):
    """The previous release's formulation (per-gene theta), kept here as the baseline."""
    mu = torch.exp(log_mu)
    rows, cols, xv = nz
    log_theta, log_theta_mu = torch.log(theta + 1e-8), torch.log(theta + mu)
    x_term = x * (log_mu - log_theta_mu)
    gamma_nz = torch.lgamma(xv + theta.index_select(0, cols)) - torch.lgamma(theta).index_select(0, cols)
    gamma_nz = gamma_nz - torch.lgamma(xv + 1)
    nb_zero = theta * (log_theta - log_theta_mu)
    sp = F.softplus(zi)
    dense = torch.where(x > 0, nb_zero - sp + x_term, torch.logaddexp(zi, nb_zero) - sp).sum(-1)
    return dense + torch.zeros(x.shape[0], dtype=x.dtype).index_add_(0, rows, gamma_nz)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import scipy.sparse as sp

    import sc_vi_ext as sv
    from sc_vi_ext.dataloader import csr_rows
    from sc_vi_ext.module import fused
    from sc_vi_ext.module.distributions import log_zinb

    X = sp.csr_matrix(sv.datasets.simulate(2000, 2000, n_batches=3, n_types=8, random_state=0).X)
    dense, nz = csr_rows(X, np.arange(128))
    x, nz = torch.from_numpy(dense), tuple(torch.from_numpy(a) for a in nz)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(128, x.shape[1], generator=gen) * 0.5
    lib = torch.log(x.sum(1))
    log_theta0 = torch.randn(x.shape[1], generator=gen) * 0.3 + 1.0
    zi0 = torch.randn(128, x.shape[1], generator=gen) - 2

    def current(x, log_mu, theta, zi, nz):
        return log_zinb(x, torch.exp(log_mu), theta, zi, log_mu, nz)

    def floor(x, log_mu, theta, zi, nz):
        return log_mu.sum(-1) + 0 * theta.sum() + 0 * zi.sum()

    def run(fn, compiled):
        fused.set_compiled(compiled)
        a, lt, zi = (t.clone().requires_grad_() for t in (logits, log_theta0, zi0))

        def step():
            log_mu = torch.log_softmax(a, -1) + lib[:, None]
            out = fn(x, log_mu, torch.exp(lt), zi, nz)
            out.sum().backward()
            return out.detach()

        t0 = time.perf_counter()
        val = step()
        first = time.perf_counter() - t0
        for _ in range(3):
            step()
        c = time.process_time()
        for _ in range(args.reps):
            step()
        fused.set_compiled(False)
        return (time.process_time() - c) / args.reps * 1e3, first, val

    print(f"# uptime: {os.popen('uptime').read().strip()}; torch threads {torch.get_num_threads()}; "
          f"{len(nz[2])} non-zeros in 128 x {x.shape[1]}")
    res = {name: run(fn, comp) for name, fn, comp in [
        ("previous (git 13149aa)", previous_log_zinb, False), ("table + eager", current, False),
        ("table + compiled", current, True), ("log-softmax only (floor)", floor, False)]}
    base = res["previous (git 13149aa)"][0]
    print("| variant | CPU ms (fwd + bwd) | vs previous | first call s | max |value - previous| (nats/cell) |")
    print("|---|---|---|---|---|")
    for name, (ms, first, val) in res.items():
        diff = "" if "floor" in name else f"{(val - res['previous (git 13149aa)'][2]).abs().max().item():.1e}"
        print(f"| {name} | {ms:.2f} | {base / ms:.2f}x | {first:.1f} | {diff} |")
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
