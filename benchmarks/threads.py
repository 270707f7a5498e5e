"""The step's second thread: torch's OpenMP workers against the likelihood kernel's thread.

    python -m benchmarks threads
    python -m benchmarks threads --quick

The training step runs its matrix products on torch's OpenMP threads and the fused likelihood
kernel's second row block on a thread of its own. After each parallel region an OpenMP worker
spin-waits (libgomp: ``GOMP_SPINCOUNT``) before it sleeps, on the core the kernel's thread
wants. Each variant runs in its own process (the spin count is read when torch loads), in
alternating rounds; per variant the median over rounds of each round's median step time (steps
after a first, warm-up epoch; the minibatch cut is not in it) and of the kernel's forward time
inside the step. A last variant compiles the encoder and the decoder networks with
``torch.compile`` (the kernel stays as it is).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ._common import parser, run_worker, save, table, uptime

VARIANTS = {  # name: (environment, compile the networks)
    "torch's default spin-wait": ({}, False),
    "GOMP_SPINCOUNT=10000": ({"GOMP_SPINCOUNT": "10000"}, False),
    "GOMP_SPINCOUNT=3000": ({"GOMP_SPINCOUNT": "3000"}, False),
    "networks compiled (torch.compile)": ({}, True),
}
PRECISIONS = ("bfloat16", "float32")


def worker(args) -> None:
    import torch

    from sc_vi_ext.acceleration import keep_freed_memory, matmul_precision
    from sc_vi_ext.module import fast_counts

    from .step import build, one_step

    cfg = json.loads(args._cfg)
    keep_freed_memory()  # as tl.vae does; torch is loaded before sc_vi_ext here, so the spin count is the environment's
    torch.set_num_threads(2)
    module, loader = build(cfg["cells"], 2000)
    if cfg["compile"]:
        module.encoder.forward = torch.compile(module.encoder.forward, dynamic=False)
        module.decoder.heads = torch.compile(module.decoder.heads, dynamic=False)
    kernel = {"s": 0.0}
    plain = fast_counts.kernel_terms  # what both the written-out and the autograd step call

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = plain(*a, **kw)
        kernel["s"] += time.perf_counter() - t0
        return out

    fast_counts.kernel_terms = timed
    out = {}
    for prec in PRECISIONS:
        ac = matmul_precision(prec, "cpu")
        opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, fused=True)
        module.train()
        steps, kern = [], []
        for ep in range(cfg["epochs"] + 1):
            for mb in loader:
                kernel["s"] = 0.0
                t0 = time.perf_counter()
                # the compiled networks run only on the autograd step (the written-out one calls neither)
                one_step(module, mb, opt, ac, fast=not cfg["compile"])
                if ep:  # the first epoch warms up (and compiles)
                    steps.append(time.perf_counter() - t0)
                    kern.append(kernel["s"])
        out[prec] = {"step_ms": float(np.median(steps) * 1e3), "kernel_ms": float(np.median(kern) * 1e3)}
    Path(args._out).write_text(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_known_args(argv)[0]
    if args._worker:
        return worker(args)
    import tempfile

    started = uptime()
    cells, epochs, rounds = (640, 1, 1) if args.quick else (6400, 3, args.rounds)
    res: dict = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for k, (name, (env, comp)) in enumerate(VARIANTS.items()):
                cfg = json.dumps({"cells": cells, "epochs": epochs, "compile": comp})
                got = run_worker("threads", sys.executable, ["--_worker", "threads", "--_cfg", cfg],
                                 Path(tmp) / f"{r}-{k}.json", env=env)
                if got is not None:
                    res[name].append(got)
    base = {prec: np.median([g[prec]["step_ms"] for g in res[next(iter(VARIANTS))]]) for prec in PRECISIONS}
    rows = []
    for name, got in res.items():
        if not got:
            continue
        for prec in PRECISIONS:
            step = float(np.median([g[prec]["step_ms"] for g in got]))
            kern = float(np.median([g[prec]["kernel_ms"] for g in got]))
            rows.append([name, prec, f"{step:.2f}", f"{kern:.2f}", f"{base[prec] / step:.2f}×"])
    tables = [table(f"The 2-thread step (ZINB, 3 batches, 128 cells, {cells} × 2,000; median over {rounds} "
                    "alternating rounds of each round's median step)",
                    ["variant", "precision", "ms per step", "kernel forward in the step, ms",
                     "speed-up over torch's default"], rows,
                    ["Each variant in its own process; the kernel alone (step table a2) takes less than inside "
                     "the step when an OpenMP worker still spins on the other core."])]
    save("threads", argv=argv if argv is not None else sys.argv[2:], quick=args.quick, tables=tables,
         started=started, data=f"simulate({cells}, 2000, n_batches=3, n_types=8)")


if __name__ == "__main__":
    main()
