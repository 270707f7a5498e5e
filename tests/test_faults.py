"""Faults of real runs: a damaged input, a backed file that breaks during training, two runs
writing one OUT, a failed run onto an existing zarr store. Nothing hangs, nothing is lost,
and each fault costs one line naming the file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

import sc_vi_ext as sv
import sc_vi_ext.tl._vae as tl_vae
from sc_vi_ext import cli

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for any one subprocess


def _damage(sim, tmp_path, case):
    """Write ``sim`` and damage the copy as in ``case``; return its path."""
    if case.startswith("zarr"):
        path = tmp_path / "in.zarr"
        sim.write_zarr(path)
        # the consolidated metadata still lists the array: anndata alone would read zeros
        shutil.rmtree(path / {"zarr-array": "X/indices", "zarr-column": "obs/batch"}[case])
        return path
    path = tmp_path / "in.h5ad"
    sim.write_h5ad(path)
    if case == "truncated":  # half a copy
        os.truncate(path, path.stat().st_size // 2)
    elif case == "h5ad-array":
        with h5py.File(path, "r+") as f:
            del f["X/indptr"]
    return path


TRUNCATED = r"truncated, [\d,]+ of its [\d,]+ bytes are there \(an interrupted copy\?\)"


@pytest.mark.parametrize("case, what", [("truncated", TRUNCATED),
                                        ("h5ad-array", r"/X/indptr missing"),
                                        ("zarr-array", r"/X/indices missing"),
                                        ("zarr-column", r"/obs/batch missing")])
def test_a_damaged_input_costs_one_line_before_any_work(case, what, sim, tmp_path, capsys, no_training):
    """A truncated h5ad, an h5ad or zarr store with an array (or a column) missing: one line naming the
    file and what is wrong, exit status 2, before training; OUT is not created."""
    path = _damage(sim, tmp_path, case)
    out = tmp_path / "out.h5ad"
    rc = cli.main(["train", str(path), str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"sc-vi-ext train: error: input {re.escape(str(path))} is damaged: {what}; "
                        r"copy or write it again", err), err
    assert not out.exists()


def _truncate_after_first_epoch(monkeypatch, path):
    """Make the file at ``path`` lose its second half once the first epoch of training has ended."""
    real = tl_vae.train

    def train(*args, **kwargs):
        def callback(epoch, module):
            if epoch == 1:
                os.truncate(path, path.stat().st_size // 2)

        return real(*args, **{**kwargs, "callback": callback})

    monkeypatch.setattr(tl_vae, "train", train)


def test_a_backed_file_truncated_during_training_is_named(sim, tmp_path, monkeypatch, fast):
    """HDF5 reads the lost part of a truncated file as zeros (or from its cache): the reader notices
    the file is shorter than when it was opened and raises an error naming it, instead of training on."""
    path = tmp_path / "in.h5ad"
    sim.write_h5ad(path)
    adata = ad.read_h5ad(path, backed="r")
    _truncate_after_first_epoch(monkeypatch, path)
    with pytest.raises(OSError, match=rf"file {re.escape(str(path))} was truncated while in use"):
        sv.tl.vae(adata, **fast)
    assert "vae" not in adata.uns and "X_vae" not in adata.obsm


def test_a_backed_file_truncated_during_train_costs_one_line(sim, tmp_path, monkeypatch, capsys):
    path, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    sim.write_h5ad(path)
    _truncate_after_first_epoch(monkeypatch, path)
    rc = cli.main(["train", str(path), str(out), "--backed", "--max-epochs", "5", "--n-threads", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sc-vi-ext train: error: ") and str(path) in err and "truncated" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_a_backed_read_error_names_the_file(sim, tmp_path):
    """An I/O error of the file system (a lost network mount) while rows are read: the error names the file."""
    from sc_vi_ext.dataloader import read_disk

    path = tmp_path / "in.h5ad"
    sim.write_h5ad(path)
    adata = ad.read_h5ad(path, backed="r")
    good = read_disk(adata.X, slice(0, 10))
    assert good.shape == (10, sim.n_vars) and np.array_equal(good.toarray(), sim.X[:10].toarray())

    class Failing:  # h5py's error for a failed read
        group = adata.X.group

        def __getitem__(self, key):
            raise OSError(5, "Can't synchronously read data (file read failed: Input/output error)")

    with pytest.raises(OSError, match=rf"could not read the backed AnnData's file {re.escape(str(path))} "
                                      r"\(OSError: .*Input/output error"):
        read_disk(Failing(), slice(0, 10))


# each run as process 1 of its own container (pid namespaces on a shared file system); its write
# of OUT waits until the other run has written too, so the two writes surely overlap
CONTAINED_RUN = """
import os, sys, time, pathlib
os.getpid = lambda: 1
import anndata
tag, barrier = sys.argv[1], pathlib.Path(sys.argv[2])
for name in ("write_h5ad", "write_zarr"):
    def overlapping(self, *args, _real=getattr(anndata.AnnData, name), **kwargs):
        _real(self, *args, **kwargs)
        (barrier / tag).touch()
        t0 = time.monotonic()
        while len(list(barrier.iterdir())) < 2 and time.monotonic() - t0 < 60:
            time.sleep(0.05)
    setattr(anndata.AnnData, name, overlapping)
from sc_vi_ext.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_two_runs_writing_one_out_at_once(suffix, sim, tmp_path):
    """Both end with status 0, OUT is the complete result of one of them, no temporary file is left."""
    sim.write_h5ad(tmp_path / "in.h5ad")
    out, barrier = tmp_path / f"out{suffix}", tmp_path / "barrier"
    barrier.mkdir()
    if suffix == ".zarr":  # an old store to replace
        sim.write_zarr(out)
    procs = [subprocess.Popen([sys.executable, "-c", CONTAINED_RUN, str(seed), str(barrier), "train",
                               str(tmp_path / "in.h5ad"), str(out), "--max-epochs", "1", "--n-threads", "1",
                               "--random-state", str(seed), "--quiet"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=_env()) for seed in (1, 2)]
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sorted(p.name for p in barrier.iterdir()) == ["1", "2"]  # the writes overlapped
    res = (ad.read_zarr if suffix == ".zarr" else ad.read_h5ad)(out)
    assert res.uns["vae"]["params"]["random_state"] in (1, 2) and res.obsm["X_vae"].shape == (sim.n_obs, 10)
    assert np.isfinite(res.obsm["X_vae"]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier", "in.h5ad", f"out{suffix}"]


def test_a_failed_swap_keeps_the_old_zarr_store_whole(sim, tmp_path, monkeypatch, capsys):
    """The new store is written, the old one moved aside, and moving the new one in fails (a file
    system error): the old store is put back, whole, and nothing else is left beside it."""
    from sc_vi_ext import cli_files

    sim.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out.zarr"
    sim.write_zarr(out)
    before = {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    for name in ("rename", "replace"):  # the new store's move into place fails, whichever call makes it
        real = getattr(os, name)

        def failing(src, dst, _real=real):
            if Path(dst) == out and Path(src).name.startswith(".out.tmp-"):  # the store's own move, not zarr's
                raise OSError(5, "Input/output error")
            return _real(src, dst)

        monkeypatch.setattr(cli_files.os, name, failing)
    rc = cli.main(["train", str(tmp_path / "in.h5ad"), str(out), "--max-epochs", "1", "--n-threads", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and re.search(r"could not write .*out\.zarr .*left as it was$", err), err
    assert {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out.zarr"]
