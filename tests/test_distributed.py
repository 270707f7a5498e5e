"""Data-parallel training: 2 processes with gloo on loopback vs one process, same global batch.

The runs go through ``tests/ddp_worker.py`` (each rank dumps its weights and history) and
``sc-vi-ext train`` under ``torchrun``; every subprocess runs under a timeout, so a rank
left waiting in a collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import sc_vi_ext as sv

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT = 120  # seconds for any one subprocess

# deterministic training (no reparameterisation noise, no dropout, BatchNorm on its running
# statistics): 2 ranks with half of each minibatch follow one process to rounding error.
# lr 0.03 and patience 2 make it stop early after about 10 epochs.
# float32: with bfloat16 products (precision="auto" on some CPUs) two half-batches round differently
# from one whole batch, so the weights could not agree to 1e-4
EXACT = {"max_epochs": 40, "batch_size": 32, "n_hidden": 64, "lr": 0.03, "n_epochs_kl_warmup": 1,
         "early_stopping_patience": 2, "batch_key": "batch", "snap_epoch": 1, "zero_noise": True, "dropout": 0,
         "freeze_batchnorm": True, "precision": "float32"}
# the real thing: noise, dropout, BatchNorm batch statistics per rank
REAL = {"max_epochs": 40, "batch_size": 32, "n_hidden": 64, "lr": 0.01, "n_epochs_kl_warmup": 1,
        "early_stopping_patience": 2, "batch_key": "batch", "snap_epoch": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # the children import this checkout's package and use one thread each
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), *args]


def _max_diff(a: dict, b: dict, prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    assert keys and set(keys) <= set(b)
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in keys)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank run and one single-process run of both configurations."""
    tmp = tmp_path_factory.mktemp("ddp")
    sv.datasets.simulate(400, 30, n_batches=2, n_types=3, random_state=0).write_h5ad(tmp / "in.h5ad")
    configs = json.dumps({"exact": EXACT, "real": REAL})
    args = [str(WORKER), str(tmp / "in.h5ad"), str(tmp), configs]
    for cmd in ([sys.executable, *args], _torchrun(*args)):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {f.stem: dict(np.load(f)) for f in tmp.glob("*.npz")}


@pytest.mark.parametrize("config", ["exact", "real"])
def test_ranks_agree_on_everything(runs, config):
    """Same weights, history, early stop and best epoch on both ranks, bit for bit: no rank can
    stop while the other waits. Without the DistributedDataParallel wrap each rank trains alone
    on its half of every minibatch, and the weights after one epoch differ by ~0.3."""
    r0, r1 = runs[f"{config}_world2_rank0"], runs[f"{config}_world2_rank1"]
    assert set(r0) == set(r1)
    for k in set(r0) - {"history/seconds"}:  # wall time differs
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
    assert r0["stopped_early"] and not r0["interrupted"]
    assert len(r0["history/epoch"]) < REAL["max_epochs"]


def test_two_ranks_follow_one_process(runs):
    """Deterministic training: the 2-rank run (global batch 32 = 2 x 16) matches one process
    with batches of 32. After one epoch (12 steps) the weights agree to 1e-4; without the
    DistributedDataParallel wrap (each rank trains alone, gradients never averaged) they differ
    by 0.3, so this fails. Both stop early at the same epoch with the same best epoch."""
    ddp, one = runs["exact_world2_rank0"], runs["exact_world1_rank0"]
    assert _max_diff(ddp, one, "snap/") < 1e-4
    assert one["stopped_early"] and ddp["stopped_early"]
    assert len(ddp["history/epoch"]) == len(one["history/epoch"]) < EXACT["max_epochs"]
    assert ddp["best_epoch"] == one["best_epoch"]
    np.testing.assert_allclose(ddp["history/elbo_validation"], one["history/elbo_validation"], rtol=1e-2)
    np.testing.assert_allclose(ddp["history/elbo_train"], one["history/elbo_train"], rtol=1e-2)
    assert _max_diff(ddp, one, "final/") < 0.05  # 10 epochs at lr 0.03 amplify rounding; no wrap: 1.5
    assert np.corrcoef(ddp["latent"].ravel(), one["latent"].ravel())[0, 1] > 0.999


def test_two_ranks_with_batchnorm_close_to_one_process(runs):
    """With noise, dropout and per-rank BatchNorm statistics the runs are not identical (and
    early stopping on a noisy validation ELBO picks different epochs), but the validation
    curves track each other."""
    ddp, one = runs["real_world2_rank0"], runs["real_world1_rank0"]
    h2, h1 = ddp["history/elbo_validation"], one["history/elbo_validation"]
    n = min(len(h1), len(h2))
    np.testing.assert_allclose(h2[:n], h1[:n], rtol=0.05)
    assert h2[ddp["best_epoch"] - 1] > h2[0] + 10 and one["stopped_early"]


def _alive(marker: str) -> list[int]:
    """Pids of processes whose command line contains ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@contextmanager
def _training_past_epoch_3(tmp_path: Path, out: Path):
    """Run ``sc-vi-ext train`` of ``tmp_path / "in.h5ad"`` under torchrun with a long budget (100,000 epochs:
    a KL warm-up of 25,000); yield the process once rank 0's progress bar is past epoch 3 (its log is
    ``tmp_path / "log.txt"``). On leaving, a job still running is killed and the log closed."""
    cmd = _torchrun("-m", "sc_vi_ext", "train", str(tmp_path / "in.h5ad"), str(out), "--max-epochs", "100000")
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while max(map(int, re.findall(r"(\d+)/100000", (tmp_path / "log.txt").read_text())), default=0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _end_and_time(proc, end) -> tuple[int, float]:
    """Call ``end()`` (a signal to the job or one of its workers); return the job's status and the seconds it took."""
    t0 = time.monotonic()
    end()
    rc = proc.wait(timeout=TIMEOUT)
    return rc, time.monotonic() - t0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc")
@pytest.mark.parametrize("sig, said", [(signal.SIGINT, "after Ctrl-C"), (signal.SIGTERM, "after SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_under_torchrun(sig, said, tmp_path):
    """SIGINT to torchrun (what Ctrl-C in a terminal sends it), or SIGTERM (a scheduler's time
    limit); torchrun forwards either to every worker: all ranks stop at the same step, rank 0
    writes the result with interrupted=True, every process exits well before torchrun's 30 s SIGKILL."""
    sv.datasets.simulate(300, 40, n_batches=2, n_types=3, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out.h5ad"
    with _training_past_epoch_3(tmp_path, out) as proc:
        _, took = _end_and_time(proc, lambda: proc.send_signal(sig))
    text = (tmp_path / "log.txt").read_text()
    assert said in text, text[-3000:]
    assert "forcefully" not in text and took < 25, text[-3000:]  # nobody needed torchrun's SIGKILL
    assert not _alive(str(out)), "a worker is still running"
    res = ad.read_h5ad(out)
    uns = res.uns["vae"]
    assert uns["interrupted"] and not uns["stopped_early"]
    assert len(uns["history"]["epoch"]) >= 3 and uns["params"]["world_size"] == 2
    assert np.isfinite(res.obsm["X_vae"]).all()


def _rank_pid(marker: str, rank: int) -> int | None:
    """Pid of the worker of ``rank`` among the processes whose command line contains ``marker``."""
    for pid in _alive(marker):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            return pid
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc")
def test_a_killed_worker_ends_the_job(tmp_path):
    """SIGKILL to rank 1 mid-training (the out-of-memory killer): rank 0 does not hang in its
    collective, the job ends with a non-zero status within seconds, the output names the dead rank
    and says OUT was not written, and an existing OUT is left as it was."""
    sv.datasets.simulate(300, 40, n_batches=2, n_types=3, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"the old result")
    with _training_past_epoch_3(tmp_path, out) as proc:
        pid = _rank_pid(str(out), 1)
        assert pid is not None
        rc, took = _end_and_time(proc, lambda: os.kill(pid, signal.SIGKILL))
    text = (tmp_path / "log.txt").read_text()
    assert rc != 0 and took < 20, (took, text[-3000:])
    assert re.search(r"rank\s*:\s*1 .*\n.*exitcode\s*:\s*-9", text), text[-3000:]  # torchrun's summary
    assert re.search(r"sc-vi-ext train: error: rank 0 lost the other ranks .*OUT was not written", text), text[-3000:]
    assert not _alive(str(out)), "a worker is still running"
    assert out.read_bytes() == b"the old result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "log.txt", "out.h5ad"]


def test_the_process_group_waits_a_minute_not_half_an_hour(monkeypatch):
    """A lost node closes no connection: the survivors wait in their collective until the process
    group's timeout, which the project sets (60 s, or SC_VI_EXT_DIST_TIMEOUT) instead of torch's 30 minutes."""
    import datetime

    import torch.distributed as dist

    from sc_vi_ext import distributed

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("SC_VI_EXT_DIST_TIMEOUT", raising=False)
    assert distributed.init_from_env()
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=60)}
    monkeypatch.setenv("SC_VI_EXT_DIST_TIMEOUT", "5")
    distributed.init_from_env()
    assert seen["timeout"] == datetime.timedelta(seconds=5)
    monkeypatch.setenv("SC_VI_EXT_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SC_VI_EXT_DIST_TIMEOUT must be a number of seconds"):
        distributed.init_from_env()
