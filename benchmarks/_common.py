"""What every scenario shares: the machine's description, timing helpers, result files, tables.

A scenario's ``main(argv)`` measures, then calls :func:`save` with its tables; ``save`` writes
``benchmarks/results/<scenario>.json`` (``results/quick/`` for ``--quick`` runs) and
regenerates ``benchmarks/RESULTS.md`` from every full result (:func:`write_results`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
K_IWAE = 100


# --------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """``lscpu``'s model name (what every table prints), or /proc/cpuinfo's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The instruction sets that decide the matrix-product rate: AVX-512, AVX-512 BF16, AMX."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    have = [name for name, flag in (("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"), ("AMX-BF16", "amx_bf16"))
            if flag in flags]
    return ", ".join(have) or "no AVX-512"


def uptime() -> str:
    """The load averages, as ``uptime`` prints them (recorded before and after every run)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def git_rev() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() or "?"


def peak_rss_mib() -> float:
    """Peak resident set size of this process (MiB): VmHWM, not ru_maxrss (which carries a parent's RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ours_first() -> None:
    """Import sc_vi_ext before torch, as a user's ``import scanpy as sc, sc_vi_ext as sv`` does: it sets
    the OpenMP spin-wait then (``sc_vi_ext/_openmp.py``). Call it before the caller imports torch."""
    import sc_vi_ext  # noqa: F401


def quiet() -> None:
    """Silence the peers' and the dependencies' chatter (warnings, Lightning's logs)."""
    warnings.filterwarnings("ignore")
    import logging

    for name in ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- the peer
SCVI_VENV_HELP = ("scvi-tools 1.5.1 needs Python >= 3.12; make its venv with\n"
                  "  python3.12 -m venv .venv-bench\n"
                  "  .venv-bench/bin/pip install -e '.[bench]'\n"
                  "and pass --scvi-python .venv-bench/bin/python")


def peer_versions(python: str) -> str:
    """scvi-tools', Lightning's, torch's and Python's versions in the peer's interpreter."""
    probe = ("import importlib.metadata as md, platform, torch; print(f\"scvi-tools {md.version('scvi-tools')}, "
             "lightning {md.version('lightning')}, torch {torch.__version__}, Python {platform.python_version()}\")")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    return out.stdout.strip() or f"no scvi-tools in {python}"


def run_worker(module: str, python: str, args: list[str], out: Path, *, env: dict | None = None,
               prefix: tuple[str, ...] = ()) -> dict | None:
    """Run ``python -m benchmarks.<module> --_worker ...`` in its own process; return its JSON (None on failure).

    ``prefix``: a command the worker runs under (e.g. ``("taskset", "-c", "0")``).
    """
    cmd = [*prefix, python, "-m", f"benchmarks.{module}", *args, "--_out", str(out)]
    print(f"# {' '.join(args[:2])} ({Path(python).parent.parent.name}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          check=False)
    if proc.returncode != 0:
        print(f"# FAILED (rc={proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f"#   done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- ours
def ours_iwae(adata, indices, *, key="vae", k=K_IWAE, seed=0) -> np.ndarray:
    """Held-out log p(x) per cell by ``sv.tl.log_likelihood`` (IWAE, K samples, the full likelihood)."""
    import sc_vi_ext as sv

    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[np.asarray(indices)] = True
    sv.tl.log_likelihood(adata, key=key, n_samples=k, subset=mask, random_state=seed, device="cpu", progress=False)
    return adata.obs[f"{key}_log_px"].to_numpy()[mask].astype(np.float64)


def shared_split(n_obs: int, seed: int = 0, train_size: float = 0.9):
    """The train/validation split ``tl.vae(random_state=seed)`` draws (the peer gets the same one)."""
    from sc_vi_ext.tl._utils import split_indices

    return split_indices(n_obs, train_size, np.random.default_rng(seed))


def quality(latent: np.ndarray, labels, batches=None) -> dict:
    """kNN accuracy, k-means ARI/NMI and batch mixing of a latent: the same code for every tool."""
    from sc_vi_ext.metrics import batch_mixing, kmeans_scores, knn_accuracy

    labels = np.asarray(labels).astype(str)
    out = {"knn_acc": knn_accuracy(latent, labels)}
    out["kmeans_ari"], out["kmeans_nmi"] = kmeans_scores(latent, labels)
    out["mixing"] = float("nan") if batches is None else batch_mixing(latent, np.asarray(batches))
    return out


# --------------------------------------------------------------------------- results
def fmt(v, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float, np.floating, np.integer)) else str(v)


def table(title: str, columns: list[str], rows: list[list], notes: list[str] = ()) -> dict:
    return {"title": title, "columns": columns, "rows": [[fmt(v, "") if not isinstance(v, str) else v for v in r]
                                                         for r in rows], "notes": list(notes)}


def save(name: str, *, argv: list[str], quick: bool, tables: list[dict], started: str, data: str = "",
         raw: dict | None = None, versions: str = "") -> Path:
    """Write the scenario's JSON and regenerate RESULTS.md (full runs only); print the tables."""
    out_dir = RESULTS / "quick" if quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    import sc_vi_ext

    doc = {"scenario": name, "command": "python -m benchmarks " + " ".join([name, *argv]), "machine": machine(),
           "versions": f"sc_vi_ext {sc_vi_ext.__version__} (git {git_rev()})" + (f"; {versions}" if versions else ""),
           "data": data, "uptime": [started, uptime()], "tables": tables, "raw": raw or {}}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=float))
    print(render(doc))
    if not quick:
        write_results()
    return path


# --------------------------------------------------------------------------- RESULTS.md
ORDER = ("speed", "step", "threads", "scale", "quality", "training", "gap", "coverage")
HEADER = """# Benchmark results

Generated by `python -m benchmarks report` from `benchmarks/results/*.json`; every table
gives the machine, the command that made it and the load (`uptime`) before and after. Do not
edit by hand: rerun the scenario. Figures from different machines are not comparable (the CPU
can change from one run of the suite to the next): compare the tools within one table.
"""


def render(doc: dict) -> str:
    """One scenario's section: what, where, how, then its tables."""
    m = doc["machine"]
    lines = [f"## {doc['scenario']}", "",
             f"- Machine: {m['cpu']} ({m['flags']}), {m['cores']} cores; Python {m['python']}, torch {m['torch']}; "
             f"{m['date']}",
             f"- Versions: {doc['versions']}",
             f"- Command: `{doc['command']}`"]
    if doc.get("data"):
        lines.append(f"- Data: {doc['data']}")
    lines += [f"- Load before: `{doc['uptime'][0]}`", f"- Load after: `{doc['uptime'][1]}`", ""]
    for t in doc["tables"]:
        lines += [f"### {t['title']}", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
        lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in t["rows"]]
        lines += [""] + [f"{n}" for n in t["notes"]] + ([""] if t["notes"] else [])
    return "\n".join(lines)


def write_results() -> Path:
    """Regenerate RESULTS.md from the full results, in the suite's order."""
    docs = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    names = [n for n in ORDER if n in docs] + sorted(set(docs) - set(ORDER))
    verdict = RESULTS / "verdict.md"  # the targets against these tables, written by whoever reran them
    text = HEADER + "\n" + (verdict.read_text() + "\n" if verdict.exists() else "") + "\n".join(
        render(docs[n]) for n in names)
    out = HERE / "RESULTS.md"
    out.write_text(text.rstrip() + "\n")
    return out


def parser(doc: str):
    """The scenario's argument parser, with the options every scenario takes (``all`` passes them on)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds; results under results/quick/")
    p.add_argument("--scvi-python", metavar="PYTHON", help="interpreter with scvi-tools 1.5.1 (and scib-metrics)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_data", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_cfg", default="{}", help=argparse.SUPPRESS)
    return p
