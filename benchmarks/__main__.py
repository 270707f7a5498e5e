"""The benchmark suite: ``python -m benchmarks <scenario> [--quick] [options]``.

Scenarios (each ``python -m benchmarks <scenario> --help`` lists its options):

- ``speed``: training per epoch and end to end against scvi-tools, with the quality of each latent;
- ``step``: the training step against the machine's matrix-product floor, one and two threads,
  and every tool's time with another process busy;
- ``threads``: the step's two threads: torch's OpenMP spin-wait against the kernel's thread, the
  networks compiled;
- ``scale``: ``tl.vae`` from 10^4 to 10^6 cells, in memory and backed;
- ``quality``: scib-metrics' Benchmarker and held-out log p(x) for sc_vi_ext, scvi-tools and PCA;
- ``training``: the encoder dropout against the held-out amortization gap and the clustering (median of 3 seeds);
- ``gap``: the amortization-gap diagnostics, time and accuracy;
- ``coverage``: reference coverage of mapped queries against the usual baselines;
- ``all``: every scenario (with ``--quick``: each in seconds, results under ``results/quick/``);
- ``report``: regenerate ``RESULTS.md`` from ``results/*.json``.

The peer runs in its own interpreter (scvi-tools 1.5.1 needs Python >= 3.12): pass
``--scvi-python PATH``; ``speed --help`` says how to make that venv. Run a benchmark alone on
the machine: anything else running changes every timing.
"""

from __future__ import annotations

import importlib
import sys

SCENARIOS = ("speed", "step", "threads", "scale", "quality", "training", "gap", "coverage")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    name, rest = argv[0], argv[1:]
    if name == "report":
        from ._common import write_results

        print(f"wrote {write_results()}")
        return
    if name == "all":
        for scenario in SCENARIOS:
            importlib.import_module(f"benchmarks.{scenario}").main(rest)
        return
    if name not in SCENARIOS:
        sys.exit(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}, all, report")
    importlib.import_module(f"benchmarks.{name}").main(rest)


if __name__ == "__main__":
    main()
