"""``sc-vi-ext`` and its files: bad paths cost one line before any work, outputs are written
atomically (a failed write leaves OUT, or IN when OUT is IN, as it was), SIGTERM is Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import sc_vi_ext as sv
from sc_vi_ext import cli

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for any one subprocess


def _one_line_error(capsys, rc, match):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(match, err), err


@pytest.mark.parametrize("case, match", [("missing", r"input .*nope\.h5ad does not exist"),
                                         ("folder", r"input .* is a folder, not an h5ad file"),
                                         ("not-h5ad", r"input .*notes\.h5ad is not an h5ad file")])
def test_bad_input_paths_give_one_line(case, match, tmp_path, capsys, no_training):
    (tmp_path / "notes.h5ad").write_text("cell,gene\n")
    path = {"missing": tmp_path / "nope.h5ad", "folder": tmp_path, "not-h5ad": tmp_path / "notes.h5ad"}[case]
    rc = cli.main(["train", str(path), str(tmp_path / "out.h5ad"), "--quiet"])
    _one_line_error(capsys, rc, rf"^sc-vi-ext train: error: {match}")


@pytest.mark.parametrize("case, match", [("missing-folder", r"folder of output .* does not exist.*mkdir -p"),
                                         ("a-folder", r"output .* is a folder; name the h5ad file")])
def test_output_is_checked_before_training(case, match, sim, tmp_path, capsys, no_training):
    sim.write_h5ad(tmp_path / "in.h5ad")
    out = {"missing-folder": tmp_path / "no" / "such" / "out.h5ad", "a-folder": tmp_path}[case]
    rc = cli.main(["train", str(tmp_path / "in.h5ad"), str(out), "--quiet"])
    _one_line_error(capsys, rc, match)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_is_refused_before_training(sim, tmp_path, capsys, no_training):
    sim.write_h5ad(tmp_path / "in.h5ad")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        rc = cli.main(["train", str(tmp_path / "in.h5ad"), str(tmp_path / "ro" / "out.h5ad"), "--quiet"])
    finally:
        (tmp_path / "ro").chmod(0o755)
    _one_line_error(capsys, rc, r"cannot write output")


# the file-size limit is set just before the result is written (the import and training write their caches)
LIMITED_WRITE = """
import resource, sys
import anndata
real = anndata.AnnData.write_h5ad
def limited(self, *args, **kwargs):
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return real(self, *args, **kwargs)
anndata.AnnData.write_h5ad = limited
from sc_vi_ext.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file-size limits")
def test_a_failed_write_leaves_out_as_it_was_even_when_out_is_in(sim, tmp_path):
    """A full disk, reproduced by a file-size limit: OUT = IN is left whole and readable."""
    path = tmp_path / "data.h5ad"
    sim.write_h5ad(path)
    before = path.read_bytes()
    script = LIMITED_WRITE.format(limit=len(before) // 2)
    proc = subprocess.run([sys.executable, "-c", script, "train", str(path), str(path), "--max-epochs", "1",
                           "--n-threads", "1", "--quiet"], capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert proc.returncode != 0
    assert path.read_bytes() == before
    ad.read_h5ad(path)  # still readable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5ad"], "a temporary file was left behind"
    if proc.returncode == 1:  # the error reached Python (HDF5 may also crash the process): one line
        assert re.search(r"^sc-vi-ext train: error: could not write .*left as it was$", proc.stderr.strip(),
                         re.MULTILINE), proc.stderr[-2000:]


def test_demo_figures_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from sc_vi_ext.cli_files import write_atomic

    target = tmp_path / "elbo.png"
    target.write_bytes(b"the old figure")
    fig = plt.figure()

    def broken(path, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(lambda tmp: broken(tmp), target)
    assert target.read_bytes() == b"the old figure" and [p.name for p in tmp_path.iterdir()] == ["elbo.png"]
    write_atomic(lambda tmp: fig.savefig(tmp), target)
    assert target.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["elbo.png"]


def test_zarr_in_and_out(sim, tmp_path):
    sim.write_zarr(tmp_path / "in.zarr")
    for _ in range(2):  # the second run replaces the first store
        assert cli.main(["train", str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr"), "--max-epochs", "1",
                         "--n-threads", "1", "--quiet"]) == 0
    out = ad.read_zarr(tmp_path / "out.zarr")
    sv.tl.log_likelihood(out, n_samples=5, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "out.zarr"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals")
def test_sigterm_keeps_the_best_epoch_like_ctrl_c(tmp_path):
    """A scheduler's time limit (SIGTERM): the best epoch so far is written, with interrupted=True."""
    sv.datasets.simulate(300, 40, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out.h5ad"
    log = open(tmp_path / "log.txt", "w+")
    # 100,000 epochs: a KL warm-up of 25,000 epochs, so training would run for a long time
    proc = subprocess.Popen([sys.executable, "-m", "sc_vi_ext", "train", str(tmp_path / "in.h5ad"), str(out),
                             "--max-epochs", "100000", "--n-threads", "1"], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while max(map(int, re.findall(r"(\d+)/100000", (tmp_path / "log.txt").read_text())), default=0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0 and "after SIGTERM, best weights so far" in text, text[-3000:]
    uns = ad.read_h5ad(out).uns["vae"]
    assert uns["interrupted"] and len(uns["history"]["epoch"]) >= 3
    assert np.isfinite(uns["history"]["elbo_validation"]).all()
