"""Speed and peak memory of ``sv.tl.log_likelihood`` as a function of the IWAE chunk size.

    for b in 24 20 18; do python benchmarks/iwae_chunk.py $b; done

Trains 1 epoch on simulate(5000, 2000), then times the IWAE (K=100) of 1000 cells with
``sc_vi_ext.diagnostics.bounds._ELEMENT_BUDGET = 2**b`` (samples x cells x genes per chunk),
one thread. Prints CPU and wall seconds and the peak RSS (VmHWM) before and after; run each
budget in its own process so that the peaks are independent.
"""

import sys
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import sc_vi_ext as sv  # noqa: E402
import sc_vi_ext.diagnostics.bounds as B  # noqa: E402


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024


def main(bits: int):
    a = sv.datasets.simulate(5000, 2000, n_batches=3, n_types=8, random_state=0)
    sv.tl.vae(a, max_epochs=1, progress=False)
    before = status("VmHWM")
    B._ELEMENT_BUDGET = 1 << bits
    mask = np.zeros(a.n_obs, bool)
    mask[:1000] = True
    c, t = time.process_time(), time.perf_counter()
    sv.tl.log_likelihood(a, n_samples=100, subset=mask, progress=False, device="cpu")
    print(f"budget 2^{bits}: cpu {time.process_time() - c:.2f}s wall {time.perf_counter() - t:.2f}s "
          f"peak {status('VmHWM'):.0f} MiB (peak before the IWAE {before:.0f}) "
          f"mean log p(x) {a.obs['vae_log_px'].mean():.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 24)
