"""Candidate speed-ups of the training step, each timed against the current library code in the same process.

    python benchmarks/candidates.py --n-cells 20000 --n-genes 2000 --steps 15 --rounds 9 --threads 1 [--compile]

Every variant runs ``--steps`` minibatches of the library's own training step (the
library's ``Minibatches`` slicing the CSR matrix, ``module.loss`` with the minibatch's
non-zeros when the library provides them, backward, Adam) from the same initial weights
and the same shuffled order. Rounds run the variants in a fresh random order; the number
reported is the median over rounds of (baseline time / variant time) *within the round*,
so drifts of the machine's load cancel. Time is process CPU time (user + sys); with one
torch thread that counts only the cycles this process got, so it is much less sensitive to
other processes than wall time (wall is shown too). Variants that change the computed
value report their largest deviation from the library's ELBO on one minibatch.

Variants are applied by swapping ``sc_vi_ext.module.distributions.log_zinb`` (which
``log_likelihood`` looks up at call time) or the optimiser for the duration of the run;
nothing in ``sc_vi_ext`` is edited.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
EPS = 1e-8


# --------------------------------------------------------------------------- likelihood variants
def log_zinb_dense(x, mu, theta, zi_logits, log_mu=None, nz=None):
    """scvi-tools' formula: every term on every entry (lgamma over all cells x genes)."""
    log_theta_mu = torch.log(theta + mu + EPS)
    nb_zero = theta * (torch.log(theta + EPS) - log_theta_mu)
    log_1m_pi = -F.softplus(zi_logits)
    zero_case = torch.logaddexp(zi_logits, nb_zero) + log_1m_pi
    lm = log_mu if log_mu is not None else torch.log(mu + EPS)
    pos = (log_1m_pi + nb_zero + x * (lm - log_theta_mu)
           + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    return torch.where(x > 0, pos, zero_case).sum(-1)


_CURRENT_LX1: list = [None]  # per-cell sum_g lgamma(x + 1) of the minibatch being processed


def make_log_zinb_without_lgamma_x1(D):
    """The library's current ``log_zinb`` with its per-step ``- torch.lgamma(xv + 1)`` removed and a
    per-cell constant (precomputed once per dataset) subtracted instead. Built from the library's
    source so it tracks the library; None when the term is not found there."""
    src = inspect.getsource(D.log_zinb)
    if "- torch.lgamma(xv + 1)" not in src:
        return None
    src = src.replace("- torch.lgamma(xv + 1)", "").replace("def log_zinb(", "def _log_zinb_no_x1(", 1)
    ns = dict(vars(D))
    exec(compile(src, "<log_zinb without lgamma(x+1)>", "exec"), ns)
    inner = ns["_log_zinb_no_x1"]

    def log_zinb_lx1(x, mu, theta, zi_logits, *a, **k):
        return inner(x, mu, theta, zi_logits, *a, **k) - _CURRENT_LX1[0]

    return log_zinb_lx1


# --------------------------------------------------------------------------- the harness
class Setup:
    def __init__(self, args):
        from scipy.special import gammaln

        import sc_vi_ext as sv
        from sc_vi_ext.inputs import check_counts, get_counts
        from sc_vi_ext.tl._utils import split_indices

        kw = {} if args.dispersion is None else {"dispersion": args.dispersion}
        adata = sv.datasets.simulate(args.n_cells, args.n_genes, n_batches=3, n_types=8, random_state=0, **kw)
        self.X = get_counts(adata, None)
        self.nnz_frac = self.X.nnz / np.prod(self.X.shape)
        totals = check_counts(self.X, "X")
        self.log_lib = np.log(totals).astype(np.float32)
        self.train_idx, _ = split_indices(adata.n_obs, 0.9, np.random.default_rng(0))
        Xl = self.X.copy()  # per-cell constant sum_g lgamma(x + 1), once per dataset
        Xl.data = gammaln(Xl.data.astype(np.float64) + 1)
        self.lgamma_x1 = np.asarray(Xl.sum(1)).ravel().astype(np.float32)
        self.G = adata.n_vars


_MODULES: dict = {}


def make_module(G, seed=0, name=None):
    """A VAE with the initial weights of ``seed``; with ``name``, the same object every call (reset
    in place), so that a compiled function keeps its guards across runs."""
    from sc_vi_ext.module import VAE

    torch.manual_seed(seed)
    fresh = VAE(G)
    if name is None:
        return fresh
    if name not in _MODULES:
        _MODULES[name] = fresh
    else:
        _MODULES[name].load_state_dict(fresh.state_dict())
    return _MODULES[name]


def loader(S, batch_size, seed=0):
    from sc_vi_ext.dataloader import Minibatches

    return Minibatches(S.X, S.train_idx, log_library=S.log_lib, batch_size=batch_size, shuffle=True,
                       rng=np.random.default_rng(seed), with_nz=True)


def loss_kwargs(module, mb) -> dict:
    """Pass the minibatch's non-zeros when both the loader and ``module.loss`` support them."""
    nz = getattr(mb, "nz", None)
    return {"nz": nz} if nz is not None and "nz" in inspect.signature(module.loss).parameters else {}


@contextlib.contextmanager
def swapped(v):
    import sc_vi_ext.module.distributions as D

    orig = D.log_zinb
    if v.get("log_zinb") is not None:
        D.log_zinb = v["log_zinb"]
    try:
        yield
    finally:
        D.log_zinb = orig


_compiled_loss: dict = {}


def _elbo_given_eps(module, x, log_library, nz, eps):
    """``module.loss`` with the noise passed in (dynamo does not trace ``torch.randn(generator=None)``)."""
    from sc_vi_ext.module.vae import LossOutput

    mean, log_var = module.inference(x, None)
    z = mean + torch.exp(0.5 * log_var) * eps
    params = module.generative(z, None, log_library)
    rec = module.log_px_z(x, params, nz) if nz is not None else module.log_px_z(x, params)
    return LossOutput(reconstruction=rec, kl=module.kl(mean, log_var, None))


def step_loss(module, mb, v, S):
    if v.get("lx1"):
        _CURRENT_LX1[0] = torch.from_numpy(S.lgamma_x1[mb.idx])
    kw = loss_kwargs(module, mb)
    if v.get("compile_loss"):
        key = id(module)
        if key not in _compiled_loss:
            _compiled_loss[key] = torch.compile(_elbo_given_eps, dynamic=True)
        eps = torch.randn(mb.x.shape[0], module.latent_dim)
        out = _compiled_loss[key](module, mb.x, mb.log_library, kw.get("nz"), eps)
    else:
        out = module.loss(mb.x, mb.batch, mb.log_library, **kw)
    return out


def run(S, v, n_steps, threads, name=None):
    torch.set_num_threads(v.get("threads", threads))
    module = make_module(S.G, name=name)
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-6, eps=0.01, **v.get("adam", {}))
    bs = v.get("batch_size", 128)
    it = iter(loader(S, bs))
    with swapped(v):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_steps):
            mb = next(it)
            out = step_loss(module, mb, v, S)
            loss = -(out.reconstruction - 0.5 * out.kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(threads)
    return dt / (n_steps * bs), dc / (n_steps * bs)  # seconds per cell: wall, CPU


def check(S, v):
    """Largest |ELBO difference| (nats per cell) vs the library on one minibatch, same weights/noise."""
    module = make_module(S.G)
    module.eval()
    mb = next(iter(loader(S, 128)))
    torch.manual_seed(1)
    r0 = module.loss(mb.x, mb.batch, mb.log_library, **loss_kwargs(module, mb)).reconstruction
    torch.manual_seed(1)
    with swapped(v):
        r1 = step_loss(module, mb, {k: x for k, x in v.items() if k != "compile_loss"}, S).reconstruction
    return float((r0 - r1).abs().max()), float(r0.abs().mean())


def variants(args):
    import sc_vi_ext.module.distributions as D

    other = 3 - args.threads if args.threads in (1, 2) else 1
    V = {
        "baseline (library code)": {},
        "Adam(fused=True)": {"adam": {"fused": True}},
        "Adam(foreach=False)": {"adam": {"foreach": False}},
        "fully dense likelihood (scvi-tools' way)": {"log_zinb": log_zinb_dense},
        "batch_size 256 (time per cell)": {"batch_size": 256},
        "batch_size 512 (time per cell)": {"batch_size": 512},
        f"torch threads {other}": {"threads": other},
    }
    lx1 = make_log_zinb_without_lgamma_x1(D)
    if lx1 is not None:
        V["per-cell sum lgamma(x+1) precomputed once"] = {"log_zinb": lx1, "lx1": True}
        V["lgamma(x+1) precomputed + Adam(fused=True)"] = {"log_zinb": lx1, "lx1": True, "adam": {"fused": True}}
    if args.compile:
        V["torch.compile(log_zinb, dynamic=True)"] = {"log_zinb": torch.compile(D.log_zinb, dynamic=True)}
        V["torch.compile(log_zinb) + Adam(fused=True)"] = {
            "log_zinb": torch.compile(D.log_zinb, dynamic=True), "adam": {"fused": True}}
        V["torch.compile(module.loss: encoder, decoder, likelihood) + Adam(fused=True)"] = {
            "compile_loss": True, "adam": {"fused": True}}
    if args.only:
        keep = [k for k in V if any(o.lower() in k.lower() for o in args.only.split(","))]
        V = {k: V[k] for k in ["baseline (library code)"] + [k for k in keep if k != "baseline (library code)"]}
    return V


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--dispersion", type=float, default=None, help="simulate(dispersion=); default: simulate's")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="add torch.compile variants (needs a C++ compiler)")
    p.add_argument("--only", help="comma-separated substrings of variant names (baseline always runs)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    S = Setup(args)
    V = variants(args)
    import subprocess

    rev = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    print(f"# sc_vi_ext git {rev}; {args.n_cells} x {args.n_genes}, {S.nnz_frac:.1%} non-zero; {args.steps} steps x "
          f"{args.rounds} rounds; torch {torch.__version__}, {args.threads} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load {os.getloadavg()[0]:.1f}")
    dev = {k: check(S, v) for k, v in V.items()}
    for k, v in V.items():  # warm-up (and compilation) outside the timing
        t0 = time.perf_counter()
        run(S, v, 3, args.threads, name=k)
        if "compile" in k:
            print(f"# warm-up incl. compilation of {k!r}: {time.perf_counter() - t0:.1f}s")
    times = {k: [] for k in V}
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):
        for k in rng.permutation(list(V)):
            times[k].append(run(S, V[k], args.steps, args.threads, name=k))
    base = np.array(times["baseline (library code)"])
    print(f"# load at end {os.getloadavg()[0]:.1f}\n")
    print("| variant | CPU ms per 128 cells (median) | CPU speed-up (median of per-round ratios) | CPU ratio min..max "
          "| wall ms per 128 cells | wall speed-up | max abs ELBO diff, nats/cell (mean abs ELBO) |")
    print("|---|---|---|---|---|---|---|")
    for k in V:
        t = np.array(times[k])
        rat = base / t
        d, ref = dev[k]
        print(f"| {k} | {np.median(t[:, 1]) * 128e3:.1f} | {np.median(rat[:, 1]):.2f}x | "
              f"{rat[:, 1].min():.2f}..{rat[:, 1].max():.2f} | {np.median(t[:, 0]) * 128e3:.1f} | "
              f"{np.median(rat[:, 0]):.2f}x | {d:.2g} ({ref:.0f}) |")


if __name__ == "__main__":
    main()
