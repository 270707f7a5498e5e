"""Run the quickstart notebook end to end (it trains a small model: about a minute on CPU).

The documentation build renders the notebook as stored, without outputs; this test is what
keeps it working. The notebook's last cell asserts its results, so a step that silently
stops writing what it should fails here too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 600


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"cell {i} has stored outputs; clear them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a non-interactive backend for figures the kernel might open outside the inline backend
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the notebook writes its h5ad here
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"notebook cell failed:\n{err}")
    elapsed = time.perf_counter() - start
    print(f"quickstart notebook ran in {elapsed:.1f} s")

    # the round trip wrote its file into the working directory, not into the repository
    assert (tmp_path / "pbmc68k_vae.h5ad").is_file()
    assert not (NOTEBOOK.parent / "pbmc68k_vae.h5ad").exists()

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code_cells):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"code cell {i} raised {errors[0].ename}: {errors[0].evalue}"

    # figures were drawn: the training curves, the UMAP and the gap plot
    n_images = sum(
        "image/png" in o.get("data", {}) for c in code_cells for o in c.outputs if o.output_type == "display_data"
    )
    assert n_images >= 3, f"expected at least 3 figures, the notebook drew {n_images}"

    last = "".join(o.get("text", "") for o in code_cells[-1].outputs if o.output_type == "stream")
    assert "all checks passed" in last
