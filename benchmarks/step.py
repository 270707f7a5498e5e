"""The training step against the machine's floor, one and two threads, and every tool under load.

    python -m benchmarks step
    python -m benchmarks step --quick

a. The floor: the step's matrix products alone (encoder 2,000 -> 128 forward and weight
   gradient; both decoder heads 128 -> 2 × 2,000 forward, input and weight gradients: 0.52
   GFLOP per 128 cells), float32 and bfloat16, at one and two threads.
a1. The memory: a 64 MiB copy's bandwidth, and the fused Adam step with its tensors in memory (as
    in a training step) against its bytes at that bandwidth.
b. The step as ``tl.vae`` runs it (the written-out step of ``module.fast_step``: fused likelihood
   kernel, fused Adam; CSR minibatches of 128 cells of a 3-batch simulation), float32 and
   bfloat16, at one and two threads: wall and CPU ms per step, best epoch of ``--epochs``; and the
   written-out and autograd steps alternating epoch by epoch (medians, and of the pairs' ratios).
a3. What a step costs whatever its size: the same step on 8 cells of 20 genes, where the
    arithmetic is nil (each op's dispatch and Python, the kernel's and Adam's fixed cost).
a4. One Linear layer of the model, forward and backward, in float32 and under bfloat16
    autocast (its casts included), at two threads: where bfloat16 pays.
b2. A candidate for two cores: two half-minibatches on two one-thread workers (through autograd),
    against table b's steps.
c. Where the step goes, both precisions at one and two threads (``torch.profiler``, self CPU time
   per op family).
d. Every tool at its defaults on PBMC, quiet and with one busy process on another core (a
   spinning Python loop), in one process each: wall seconds and the ratio (target <= 1.6).
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ._common import ours_first, parser, run_worker, save, table, uptime

FAMILIES = [  # first match wins
    ("matrix products (Linear forward and backward)", ("mm", "addmm", "linear")),
    ("fused likelihood kernel (forward and backward)", ("_FusedCounts", "fused_counts_kernel")),
    ("Adam", ("adam", "Optimizer", "zero_grad")),
    ("batch norm", ("batch_norm",)),
    ("copies, casts, allocation", ("copy_", "to", "from_numpy", "empty", "zeros", "clone")),
]
TOOLS = ("vae", "amortization_gap", "trust_score", "refine", "log_likelihood", "normalized_expression",
         "differential_expression", "posterior_predictive", "vae_map")


def gemm_gflop(n_genes=2000, hidden=128, batch=128) -> float:
    """GFLOP of the step's matrix products (those :func:`gemm_ms` times): 2 + 3 products of 2·m·n·k."""
    return 2 * batch * hidden * n_genes * (2 + 3 * 2) / 1e9


def best_ms(fn, *, reps: int, warmup: int) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones, in ms."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def gemm_ms(threads: int, dtype, n_genes=2000, hidden=128, batch=128, reps=30) -> float:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, we = torch.rand(batch, n_genes, generator=g), torch.rand(n_genes, hidden, generator=g)
    h, wd = torch.rand(batch, hidden, generator=g), torch.rand(hidden, 2 * n_genes, generator=g)
    gd = torch.rand(batch, 2 * n_genes, generator=g)
    x, we, h, wd, gd = (t.to(dtype) for t in (x, we, h, wd, gd))

    def once():
        x @ we, x.T @ h  # encoder: forward, weight gradient
        h @ wd, gd @ wd.T, h.T @ gd  # decoder heads: forward, input gradient, weight gradient

    return best_ms(once, reps=reps, warmup=3)


def parts_ms(module, loader, threads: int, reps: int = 50) -> tuple[float, float]:
    """Return the fused ZINB kernel's time (value and gradients, one minibatch, as the step calls it) and one
    fused Adam step's, ms."""
    import torch

    from sc_vi_ext.module import fast_counts

    torch.set_num_threads(threads)
    mb = next(iter(loader))
    g = torch.Generator().manual_seed(0)
    logits, zi = torch.randn(mb.x.shape, generator=g), torch.randn(mb.x.shape, generator=g)
    theta = torch.exp(module.log_theta).detach()
    index = torch.zeros(mb.x.shape[0], dtype=torch.int64)

    def kernel():
        fast_counts.kernel_terms(fast_counts.MODES["zinb"], mb.x, fast_counts.row_nonzeros(mb.x, mb.nz), logits, zi,
                                 mb.log_library, theta, index, grad=True)

    params = [p.detach().clone() for p in module.parameters()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = torch.optim.Adam(params, lr=1e-3, eps=0.01, fused=True)
    return best_ms(kernel, reps=reps, warmup=5), best_ms(opt.step, reps=reps, warmup=5)


SWEEP_MB = 64  # larger than the last-level cache (32 MiB here)


def memory_floor(module, threads: int, reps: int = 30) -> tuple[float, float, float]:
    """Return this machine's memory bandwidth (GB/s, a copy of ``SWEEP_MB`` MiB) and one fused Adam step's ms
    with its tensors in memory (after a sweep that evicts them from the caches), with the ms that its
    bytes take at that bandwidth.

    Adam reads the parameters, gradients and both moments and writes all but the gradients: 7 float32
    arrays of the parameters' size per step, whatever the threads.
    """
    import torch

    torch.set_num_threads(threads)
    src, dst = torch.ones(SWEEP_MB << 18), torch.empty(SWEEP_MB << 18)
    gbps = 2 * src.numel() * 4 / best_ms(lambda: dst.copy_(src), reps=10, warmup=2) / 1e6
    params = [p.detach().clone() for p in module.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-3, eps=0.01, fused=True)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(reps):
        dst.copy_(src)  # evict
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    n_bytes = 7 * 4 * sum(p.numel() for p in params)
    return gbps, float(np.median(times)) * 1e3, n_bytes / gbps / 1e6


def build(n_cells: int, n_genes: int, batch_size: int = 128):
    import torch

    import sc_vi_ext as sv
    from sc_vi_ext.dataloader import Minibatches
    from sc_vi_ext.inputs import check_counts, get_counts
    from sc_vi_ext.module import VAE

    adata = sv.datasets.simulate(n_cells, n_genes, n_batches=3, n_types=8, random_state=0)
    X = get_counts(adata, None)
    totals = check_counts(X, "X")
    codes = adata.obs["batch"].cat.codes.to_numpy()
    torch.manual_seed(0)
    module = VAE(n_genes, n_batch=3)
    loader = Minibatches(X, np.arange(n_cells), batch=codes, log_library=np.log(totals).astype(np.float32),
                         batch_size=batch_size, with_nz=True, shuffle=True, rng=np.random.default_rng(0))
    return module, loader


def model_layers(module) -> list[tuple[int, int, bool]]:
    """The distinct Linear layers of ``module``: (inputs, outputs, whether the step needs their input gradient).

    Only the encoder's first layer takes the data, which needs no gradient.
    """
    import torch

    first = module.encoder.net.layers[0][0]
    shapes = {(m.in_features, m.out_features, m is not first) for m in module.modules()
              if isinstance(m, torch.nn.Linear)}
    return sorted(shapes, key=lambda s: s[0] * s[1])


def layer_us(n_in: int, n_out: int, input_grad: bool, *, threads: int = 2, reps: int = 200) -> tuple[float, float]:
    """One Linear layer on 128 cells, forward and backward: (float32, bfloat16 autocast) microseconds."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, n_in, generator=g).requires_grad_(input_grad)
    w = torch.randn(n_out, n_in, generator=g).requires_grad_(True)
    b = torch.randn(n_out, generator=g).requires_grad_(True)
    grad = torch.randn(128, n_out, generator=g)

    def plain():
        F.linear(x, w, b).backward(grad)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.linear(x, w, b)
        y.float().backward(grad)  # the model takes every layer's output in float32

    return tuple(best_ms(f, reps=reps, warmup=10) * 1e3 for f in (plain, autocast))


def one_step(module, mb, opt, autocast, *, fast: bool = True) -> None:
    """One training step on minibatch ``mb`` as ``tl.vae`` takes it (KL weight 1); ``fast=False``: the autograd step.

    ``fast=True`` takes the written-out step where it applies (``tl.vae`` checks that once per epoch).
    """
    from sc_vi_ext.train import train_step

    train_step(module, module, mb, opt, 1.0, fast=fast, autocast=autocast)


def epoch(module, loader, opt, autocast, *, fast: bool = True) -> None:
    from sc_vi_ext.train import uses_fast_step

    module.train()
    fast = fast and uses_fast_step(module, "cpu")
    for mb in loader:
        one_step(module, mb, opt, autocast, fast=fast)


def _timed_setup(module, threads: int, precision: str):
    """Set up a timed run as tl.vae trains: its allocator setting, ``threads``, fused Adam; return (Adam, autocast)."""
    import torch

    from sc_vi_ext.acceleration import keep_freed_memory, matmul_precision

    keep_freed_memory()
    torch.set_num_threads(threads)
    return torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, fused=True), matmul_precision(precision, "cpu")


def step_ms(module, loader, threads: int, precision: str, epochs: int, *, fast: bool = True) -> tuple[float, float]:
    opt, ac = _timed_setup(module, threads, precision)
    epoch(module, loader, opt, ac, fast=fast)  # warm-up
    wall = cpu = float("inf")
    for _ in range(epochs):
        c, w = time.process_time(), time.perf_counter()
        epoch(module, loader, opt, ac, fast=fast)
        wall = min(wall, (time.perf_counter() - w) / len(loader) * 1e3)
        cpu = min(cpu, (time.process_time() - c) / len(loader) * 1e3)
    return wall, cpu


def paired_ms(module, loader, threads: int, precision: str, pairs: int) -> tuple[float, float, float]:
    """The written-out step against the autograd step, epochs alternating: (median ms of each, median pair ratio)."""
    opt, ac = _timed_setup(module, threads, precision)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(pairs + 1):
        for fast in (True, False) if i % 2 else (False, True):
            t0 = time.perf_counter()
            epoch(module, loader, opt, ac, fast=fast)
            if i:  # the first pair warms up
                times[fast].append((time.perf_counter() - t0) / len(loader) * 1e3)
    ratios = [a / f for a, f in zip(times[False], times[True], strict=True)]
    return float(np.median(times[True])), float(np.median(times[False])), float(np.median(ratios))


def split_step_ms(module, loader, precision: str, epochs: int) -> tuple[float, float]:
    """A candidate design: each minibatch in two halves, each half's forward and backward on its own 1-thread worker.

    Python threads (torch and the numba kernel release the GIL), a replica of the module that
    shares the parameters and keeps its own BatchNorm buffers, the two halves' gradients summed
    in a fixed order, then one fused Adam step. Data parallelism inside one process: measured
    here against torch's own two threads, not used by ``tl.vae``.
    """
    import copy
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from sc_vi_ext.acceleration import matmul_precision

    torch.set_num_threads(1)
    params = list(module.parameters())
    replica = copy.deepcopy(module)
    for name, p in module.named_parameters():  # the replica's parameters are the module's own tensors
        *path, leaf = name.split(".")
        m = replica
        for part in path:
            m = getattr(m, part)
        setattr(m, leaf, p)
    ac = matmul_precision(precision, "cpu")
    opt = torch.optim.Adam(params, lr=1e-3, eps=0.01, fused=True)

    def half(mod, x, b, ll, nz, n):
        with ac:
            out = mod(x, b, ll, None, nz)
        return torch.autograd.grad(-(out.reconstruction - out.kl).sum() / n, params)

    def run_epoch(pool):
        module.train()
        replica.train()
        for mb in loader:
            n = len(mb.idx)
            h = n // 2
            r, c, v = mb.nz
            k = int(torch.searchsorted(r, h))
            fa = pool.submit(half, module, mb.x[:h], mb.batch[:h], mb.log_library[:h], (r[:k], c[:k], v[:k]), n)
            fb = pool.submit(half, replica, mb.x[h:], mb.batch[h:], mb.log_library[h:], (r[k:] - h, c[k:], v[k:]), n)
            for p, ga, gb in zip(params, fa.result(), fb.result(), strict=True):
                p.grad = ga.add_(gb)
            opt.step()

    with ThreadPoolExecutor(2) as pool:
        run_epoch(pool)  # warm-up
        wall = cpu = float("inf")
        for _ in range(epochs):
            c0, w0 = time.process_time(), time.perf_counter()
            run_epoch(pool)
            wall = min(wall, (time.perf_counter() - w0) / len(loader) * 1e3)
            cpu = min(cpu, (time.process_time() - c0) / len(loader) * 1e3)
    return wall, cpu


def profile_shares(module, loader, *, threads: int = 1, precision: str = "float32") -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    opt, ac = _timed_setup(module, threads, precision)
    epoch(module, loader, opt, ac)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        epoch(module, loader, opt, ac)
    fam: collections.Counter = collections.Counter()
    for e in prof.key_averages():
        fam[next((f for f, keys in FAMILIES if any(k.lower() in e.key.lower() for k in keys)),
                 "other element-wise, autograd, Python")] += e.self_cpu_time_total
    total = sum(fam.values())
    return [(k, 100 * v / total) for k, v in fam.most_common()]


# --------------------------------------------------------------------------- d: the tools under load
def tool_worker(args) -> None:
    """Time every tool once, in the order of TOOLS, on a PBMC model trained here (quietly or not)."""
    import warnings

    warnings.filterwarnings("ignore")
    import sc_vi_ext as sv

    cfg = json.loads(args._cfg)
    adata = sv.datasets.pbmc68k()
    groups = adata.obs["bulk_labels"].astype(str)
    calls = {
        "vae": lambda: sv.tl.vae(adata, max_epochs=cfg["epochs"], progress=False),
        "amortization_gap": lambda: sv.tl.amortization_gap(adata, n_cells=cfg["cells"], progress=False),
        "trust_score": lambda: sv.tl.trust_score(adata, progress=False),
        "refine": lambda: sv.tl.refine(adata, progress=False),
        "log_likelihood": lambda: sv.tl.log_likelihood(adata, n_samples=100, progress=False),
        "normalized_expression": lambda: sv.tl.normalized_expression(adata, n_samples=10, progress=False),
        "differential_expression": lambda: sv.tl.differential_expression(
            adata, groupby="bulk_labels", groups=[groups.iloc[0]], progress=False),
        "posterior_predictive": lambda: sv.tl.posterior_predictive(adata, progress=False),
        "vae_map": lambda: sv.tl.vae_map(adata[:200].copy(), reference=adata, max_epochs=cfg["epochs"], progress=False),
    }
    out = {}
    for name in TOOLS:
        t0 = time.perf_counter()
        calls[name]()
        out[name] = time.perf_counter() - t0
    Path(args._out).write_text(json.dumps(out))


def under_load(quick: bool, tmp: Path) -> dict:
    cfg = json.dumps({"epochs": 20 if quick else 100, "cells": 60 if quick else 200})
    res = {}
    for state in ("quiet", "loaded", "quiet again", "one core"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if state == "loaded" else None
        prefix = ("taskset", "-c", "0") if state == "one core" else ()
        try:
            res[state] = run_worker("step", sys.executable, ["--_worker", "tools", "--_cfg", cfg],
                                    tmp / f"tools-{state.replace(' ', '-')}.json", prefix=prefix)
        finally:
            if spinner is not None:
                spinner.kill()
    return res


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--n-cells", type=int, default=6400)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-load", action="store_true", help="skip (d), the tools under load")
    args = p.parse_known_args(argv)[0]
    if args._worker:
        return tool_worker(args)
    ours_first()
    import tempfile

    import torch

    from sc_vi_ext.acceleration import bf16_fast_on_cpu, keep_freed_memory

    keep_freed_memory()  # as tl.vae does: every table below runs with it
    started = uptime()
    n_cells, epochs = (640, 1) if args.quick else (args.n_cells, args.epochs)
    precisions = ["float32"] + (["bfloat16"] if bf16_fast_on_cpu() else [])
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    floor = {(prec, t): gemm_ms(t, dtypes[prec]) for prec in precisions for t in (1, 2)}  # measured once each
    rows = [[prec, f"{t}", f"{v:.2f}", f"{gemm_gflop() / v * 1e3:.0f}"] for (prec, t), v in floor.items()]
    tables = [table(f"a. The floor: the step's matrix products alone ({gemm_gflop():.2f} GFLOP per 128 cells)",
                    ["precision", "threads", "ms per step", "GFLOP/s"], rows)]
    module, loader = build(n_cells, 2000)
    parts = {t: parts_ms(module, loader, t) for t in (1, 2)}
    mem = {t: memory_floor(module, t) for t in (1, 2)}
    tables.append(table("a1. Memory: the bandwidth of a 64 MiB copy, and the fused Adam step with its tensors "
                        "in memory",
                        ["threads", "GB/s", "Adam step, tensors in memory (ms)", "its bytes at that bandwidth (ms)",
                         "Adam step, tensors in cache (ms, table a2)"],
                        [[f"{t}", f"{mem[t][0]:.1f}", f"{mem[t][1]:.2f}", f"{mem[t][2]:.2f}", f"{parts[t][1]:.2f}"]
                         for t in (1, 2)],
                        ["In a training step the optimiser meets its 7 × 3.1 MB of parameters, gradients and "
                         "moments after the step's other work has passed through the cache: there its floor is "
                         "the memory's bandwidth, not the cache's."]))
    fastest = precisions[-1]  # bfloat16 where the CPU has it
    rows = [[f"{t}", f"{floor[fastest, t]:.2f}", f"{parts[t][0]:.2f}", f"{parts[t][1]:.2f}",
             f"{floor[fastest, t] + sum(parts[t]):.2f}"] for t in (1, 2)]
    tables.append(table("a2. The other fixed parts of a step alone (ms per 128-cell step)",
                        ["threads", f"matrix products ({fastest}, table a)", "fused ZINB kernel, forward + backward",
                         "fused Adam step", "sum"], rows,
                        ["What a step costs with nothing else: no BatchNorm, casts, element-wise work, minibatch or "
                         "autograd bookkeeping."]))
    ms = {(prec, t): step_ms(module, loader, t, prec, epochs) for prec in precisions for t in (1, 2)}
    paired = {(prec, t): paired_ms(module, loader, t, prec, max(epochs, 2) * 2) for prec in precisions for t in (1, 2)}
    tiny = build(800, 20, batch_size=8)
    tiny_ms = {(prec, t): step_ms(*tiny, t, prec, max(epochs, 2))[0] for prec in precisions for t in (1, 2)}
    rows = [[prec, f"{t}", f"{ms[prec, t][0]:.2f}", f"{ms[prec, t][1]:.2f}", f"{ms[prec, 1][0] / ms[prec, t][0]:.2f}×",
             f"{ms[prec, t][0] / floor[prec, t]:.1f}×", f"{paired[prec, t][0]:.2f}", f"{paired[prec, t][1]:.2f}",
             f"{paired[prec, t][2]:.2f}×"]
            for prec in precisions for t in (1, 2)]
    tables.append(table(f"b. The training step (ZINB, 3 batches, 128 cells, {n_cells} × 2,000; best of {epochs} "
                        "epochs)",
                        ["precision", "threads", "wall ms / step", "CPU ms / step", "speed-up over 1 thread",
                         "step / its floor", "alternating: written-out step, median ms", "autograd step, median ms",
                         "autograd / written-out (median of pairs)"], rows,
                        ["The step tl.vae takes: its ELBO and gradient written out (module.fast_step). The autograd "
                         "step is the same computation through the plain module under autocast; the last three "
                         "columns alternate the two, epoch by epoch."]))
    rows = [[prec, f"{t}", f"{tiny_ms[prec, t]:.2f}", f"{ms[prec, t][0]:.2f}",
             f"{100 * tiny_ms[prec, t] / ms[prec, t][0]:.0f} %"] for prec in precisions for t in (1, 2)]
    tables.append(table("a3. What a step costs whatever its size: the same step on 8 cells × 20 genes (ms per step)",
                        ["precision", "threads", "tiny step", "the step (table b)", "share of the step"], rows,
                        ["The tiny step does no arithmetic to speak of: what it takes is each op's dispatch and "
                         "Python (and the kernel's and Adam's fixed cost), paid again by the full step."]))
    if "bfloat16" in precisions:
        layers = model_layers(module)
        lay = {spec: layer_us(*spec) for spec in layers}
        rows = [[f"{i} → {o}" + ("" if gx else " (no input gradient)"), f"{lay[i, o, gx][0]:.0f}",
                 f"{lay[i, o, gx][1]:.0f}", f"{lay[i, o, gx][0] / lay[i, o, gx][1]:.2f}×"] for i, o, gx in layers]
        tables.append(table("a4. One Linear layer on 128 cells, forward + backward, 2 threads (µs, best of 200)",
                            ["layer (inputs → outputs)", "float32", "bfloat16 autocast, casts included",
                             "float32 / bfloat16"], rows,
                            ["The model's distinct Linear layers (inputs include the 3 batches' one-hot where "
                             "the layer takes them); the encoder's input layer alone needs no input gradient."]))
    split = {prec: split_step_ms(module, loader, prec, epochs) for prec in precisions}
    rows = [[prec, f"{ms[prec, 1][0]:.2f}", f"{ms[prec, 2][0]:.2f}", f"{split[prec][0]:.2f}", f"{split[prec][1]:.2f}",
             f"{ms[prec, 1][0] / split[prec][0]:.2f}×", f"{ms[prec, 2][0] / split[prec][0]:.2f}×"]
            for prec in precisions]
    tables.append(table("b2. A candidate for two cores: two half-minibatches on two one-thread workers (ms per step)",
                        ["precision", "1 thread", "2 torch threads", "2 workers, wall", "2 workers, CPU",
                         "1 thread / 2 workers", "2 threads / 2 workers"], rows,
                        ["> 1 in the last columns: the two workers are faster. Each half has its own BatchNorm "
                         "statistics (64 cells)."]))
    # the profile at one thread and at two, each precision
    shares = {(prec, t): dict(profile_shares(module, loader, threads=t, precision=prec))
              for prec in precisions for t in (1, 2)}
    fams = [f for f, _ in FAMILIES] + ["other element-wise, autograd, Python"]
    cols = [f"{prec}, {t} thread{'s' * (t > 1)}" for prec in precisions for t in (1, 2)]
    tables.append(table("c. Where the step goes (torch.profiler: each op's self time on the calling thread, "
                        "share per op family)",
                        ["op family", *cols],
                        [[f, *(f"{shares[prec, t].get(f, 0.0):.1f} %" for prec in precisions for t in (1, 2))]
                         for f in fams]))
    if not args.no_load:
        with tempfile.TemporaryDirectory() as tmp:
            res = under_load(args.quick, Path(tmp))
        rows = []
        for name in TOOLS:
            q = [res[s][name] for s in ("quiet", "quiet again") if res.get(s)]
            lo = res["loaded"][name] if res.get("loaded") else float("nan")
            one = res["one core"][name] if res.get("one core") else float("nan")
            rows.append([f"tl.{name}", f"{min(q):.2f}", f"{lo:.2f}", f"{lo / min(q):.2f}×", f"{one:.2f}",
                         f"{lo / one:.2f}×"])
        tables.append(table("d. Each tool at its defaults on PBMC (700 cells), quiet and with one busy process",
                            ["tool", "quiet s (best of 2)", "loaded s", "loaded / quiet", "quiet on one core s",
                             "loaded / one core"], rows,
                            ["tl.vae and tl.vae_map: 100 epochs (20 with --quick); tl.amortization_gap: 200 cells. "
                             "Loaded: a spinning process on one of the two cores. One core: the tool pinned to one "
                             "core (taskset) on the quiet machine: what the loaded run can at best get."]))
    save("step", argv=argv if argv is not None else sys.argv[2:], quick=args.quick, tables=tables, started=started,
         data=f"simulate({n_cells}, 2000, n_batches=3, n_types=8); sv.datasets.pbmc68k()")


if __name__ == "__main__":
    main()
