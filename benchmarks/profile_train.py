"""Where does one training epoch of ``sv.tl.vae`` spend its time?

    python benchmarks/profile_train.py --n-cells 20000 --n-genes 2000 --threads 1

Builds exactly what ``tl.vae`` builds (module, minibatches, Adam), then runs the training
loop of ``sc_vi_ext.train.train`` by hand for ``--steps`` minibatches, twice:

1. stage timers (perf_counter around each stage; CPU ops are synchronous): minibatch
   slicing, encoder, decoder, likelihood, KL, backward, optimiser step;
2. ``torch.profiler`` over the same steps: self CPU time per op, grouped into families
   (lgamma/digamma, matmul, elementwise, nonzero/gather/scatter ...), forward and backward
   together (autograd ops are named ``...Backward``).
"""

from __future__ import annotations

import argparse
import collections
import os
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")


def build(n_cells, n_genes, dispersion, batch_size=128, seed=0):
    import sc_vi_ext as sv
    from sc_vi_ext.dataloader import Minibatches
    from sc_vi_ext.inputs import check_counts, get_counts
    from sc_vi_ext.module import VAE
    from sc_vi_ext.tl._utils import split_indices

    kw = {} if dispersion is None else {"dispersion": dispersion}
    adata = sv.datasets.simulate(n_cells, n_genes, n_batches=3, n_types=8, random_state=0, **kw)
    X = get_counts(adata, None)
    totals = check_counts(X, "X")
    rng = np.random.default_rng(seed)
    tr, va = split_indices(adata.n_obs, 0.9, rng)
    torch.manual_seed(seed)
    module = VAE(adata.n_vars)
    loader = Minibatches(X, tr, log_library=np.log(totals).astype(np.float32), batch_size=batch_size,
                         shuffle=True, rng=rng, with_nz=True)
    return adata, X, module, loader


def _nz_kw(module, mb) -> dict:
    """The minibatch's non-zeros for ``log_px_z`` when the library provides and accepts them."""
    import inspect

    nz = getattr(mb, "nz", None)
    return {"nz": nz} if nz is not None and "nz" in inspect.signature(module.log_px_z).parameters else {}


def make_adam(params):
    """Adam as ``sc_vi_ext.train`` builds it (fused when this torch supports it on CPU)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=1e-3, weight_decay=1e-6, eps=0.01, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=1e-3, weight_decay=1e-6, eps=0.01)


def stage_times(module, loader, steps):
    opt = make_adam(module.parameters())
    module.train()
    T = collections.defaultdict(float)
    it = iter(loader)
    t_all = time.perf_counter()
    for _step in range(steps):
        t = time.perf_counter()
        try:
            mb = next(it)
        except StopIteration:
            it = iter(loader)
            mb = next(it)
        t1 = time.perf_counter()
        T["minibatch (rows_dense + tensors)"] += t1 - t
        mean, log_var = module.inference(mb.x, mb.batch)
        eps = torch.randn(mean.shape)
        z = mean + torch.exp(0.5 * log_var) * eps
        t2 = time.perf_counter()
        T["encoder forward (log1p, Linear 2000->128, BN, heads)"] += t2 - t1
        params = module.generative(z, mb.batch, mb.log_library)
        t3 = time.perf_counter()
        T["decoder forward (Linear 128->2x2000, log_softmax, exp)"] += t3 - t2
        rec = module.log_px_z(mb.x, params, **_nz_kw(module, mb))
        t4 = time.perf_counter()
        T["likelihood forward (log_zinb)"] += t4 - t3
        kl = module.kl(mean, log_var, mb.batch)
        loss = -(rec - 0.5 * kl).mean()
        t5 = time.perf_counter()
        T["KL + loss"] += t5 - t4
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t6 = time.perf_counter()
        T["backward (all)"] += t6 - t5
        opt.step()
        t7 = time.perf_counter()
        T["Adam step"] += t7 - t6
        _ = rec.detach().sum(), kl.detach().sum()
        T["bookkeeping"] += time.perf_counter() - t7
    total = time.perf_counter() - t_all
    return T, total


def ablation(module, loader, steps, reps=3):
    """CPU seconds per step of the full step and of the step with parts taken out (1 thread:
    CPU time is robust to other load). The differences give each part's share, forward and
    backward together."""
    import copy

    def step_fn(kind):
        m = copy.deepcopy(module)
        opt = make_adam(m.parameters())
        m.train()
        mbs = []
        it = iter(loader)
        for _ in range(steps):
            try:
                mbs.append(next(it))
            except StopIteration:
                it = iter(loader)
                mbs.append(next(it))
        c0 = time.process_time()
        if kind == "data only":
            for _ in range(steps):
                try:
                    next(it)
                except StopIteration:
                    it = iter(loader)
            return (time.process_time() - c0) / steps
        for mb in mbs:
            mean, log_var = m.inference(mb.x, mb.batch)
            z = mean + torch.exp(0.5 * log_var) * torch.randn(mean.shape)
            p = m.generative(z, mb.batch, mb.log_library)
            if kind == "no likelihood":
                rec = (p["mu"] * 1e-3).sum(-1) + p["zi_logits"].sum(-1) + p["theta"].sum()
            else:
                rec = m.log_px_z(mb.x, p, **_nz_kw(m, mb))
            loss = -(rec - 0.5 * m.kl(mean, log_var, mb.batch)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if kind != "no optimiser":
                opt.step()
        return (time.process_time() - c0) / steps

    kinds = ["full step (minibatches pre-sliced)", "no likelihood", "no optimiser", "data only"]
    res = {k: [] for k in kinds}
    for _ in range(reps):
        for k in kinds:
            res[k].append(step_fn(k))
    return {k: float(np.median(v)) for k, v in res.items()}


FAMILIES = [
    ("lgamma / digamma (likelihood)", ("lgamma", "digamma", "polygamma")),
    ("matmul / linear (addmm, mm)", ("addmm", "aten::mm", "matmul", "linear", "aten::t", "bmm")),
    ("nonzero / gather / index / scatter", ("nonzero", "index", "gather", "scatter", "take", "masked")),
    ("log / exp / softplus / log_softmax / log1p",
     ("aten::log", "aten::exp", "softplus", "softmax", "log1p", "sigmoid")),
    ("batch norm", ("batch_norm",)),
    ("sum / mean reductions", ("aten::sum", "aten::mean")),
    ("optimizer (Adam)", ("Optimizer", "adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("elementwise arithmetic (add/mul/sub/div/neg/pow/relu/dropout)",
     ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::neg", "aten::pow", "relu", "threshold", "dropout",
      "bernoulli", "rsub", "where")),
    ("copies / allocation / views",
     ("copy_", "empty", "zeros", "fill_", "clone", "to", "contiguous", "cat", "expand", "view", "reshape", "as_strided",
      "select", "slice", "ones", "new_", "randn", "normal_", "uniform_")),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return "other: " + name


def op_profile(module, loader, steps, top=25):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        T, total = stage_times(module, loader, steps)
    ev = prof.key_averages()
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in ev]
    op_total = sum(r[1] for r in rows)
    fam = collections.defaultdict(float)
    for k, t, _ in rows:
        if k.startswith("autograd::engine"):
            k = k.split(":")[-1].strip()
        fam[family(k)] += t
    return rows, op_total, fam, total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--dispersion", type=float, default=None, help="simulate(dispersion=); default: simulate's")
    p.add_argument("--steps", type=int, default=0, help="minibatches (0: one epoch)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-profiler", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adata, X, module, loader = build(args.n_cells, args.n_genes, args.dispersion)
    steps = args.steps or len(loader)
    print(f"# {args.n_cells} x {args.n_genes}, {X.nnz / np.prod(X.shape):.1%} non-zero, {steps} steps of 128 cells, "
          f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    stage_times(module, loader, 5)  # warm-up
    T, total = stage_times(module, loader, steps)
    print(f"\n## stage timers: {total:.2f}s for {steps} steps ({total / steps * 1e3:.1f} ms/step)\n")
    print("| stage | ms/step | % |\n|---|---|---|")
    for k, v in sorted(T.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v / steps * 1e3:.2f} | {100 * v / total:.1f} |")
    ab = ablation(module, loader, min(steps, 60))
    full = ab["full step (minibatches pre-sliced)"]
    print("\n## ablation (CPU ms per step, median of 3; forward + backward of each part)\n")
    print("| part | CPU ms/step | % of (full step + slicing) |\n|---|---|---|")
    tot = full + ab["data only"]
    parts = {
        "likelihood log_zinb, forward + backward (full - no likelihood)": full - ab["no likelihood"],
        "Adam step (full - no optimiser)": full - ab["no optimiser"],
        "networks + KL + autograd rest (no likelihood - Adam)": ab["no likelihood"] - (full - ab["no optimiser"]),
        "minibatch slicing (rows_dense + tensors)": ab["data only"],
    }
    for k, v in parts.items():
        print(f"| {k} | {v * 1e3:.2f} | {100 * v / tot:.1f} |")
    print(f"| total | {tot * 1e3:.2f} | 100 |")
    if args.no_profiler:
        return
    rows, op_total, fam, total = op_profile(module, loader, steps)
    print(f"\n## torch.profiler self CPU time by op family ({op_total:.2f}s of ops, wall {total:.2f}s "
          f"incl. profiler overhead; the remainder is Python/dispatch)\n")
    print("| family | s | % of op time |\n|---|---|---|")
    for k, v in sorted(fam.items(), key=lambda kv: -kv[1]):
        if v / op_total > 0.003:
            print(f"| {k} | {v:.2f} | {100 * v / op_total:.1f} |")
    print("\n## top ops (self CPU)\n")
    print("| op | s | calls | % |\n|---|---|---|---|")
    for k, t, c in sorted(rows, key=lambda r: -r[1])[:25]:
        print(f"| {k} | {t:.3f} | {c} | {100 * t / op_total:.1f} |")


if __name__ == "__main__":
    main()
