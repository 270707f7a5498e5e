"""Run the quickstart notebook end to end (it trains a small model and runs the gap diagnostics).

The documentation build renders the notebook as stored, without outputs; this test is what
keeps it working. The notebook's last cell asserts its results, so a step that silently
stops writing what it should fails here too. Run with ``-s`` to see the time per cell; set
``SC_VI_EXT_NOTEBOOK_OUT=path.ipynb`` to keep the executed notebook (with outputs) for a look.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 600


def _cell_seconds(cell) -> float | None:
    """Execution time nbclient recorded in the cell's metadata (None when it did not run)."""
    timing = cell.get("metadata", {}).get("execution", {})
    try:
        start = datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return (end - start).total_seconds()


def _timing_report(nb, total: float) -> str:
    lines = [f"quickstart notebook: {total:.1f} s in all; slowest cells:"]
    code = [(i, c) for i, c in enumerate(c for c in nb.cells if c.cell_type == "code")]
    timed = sorted(((_cell_seconds(c), i, c) for i, c in code if _cell_seconds(c) is not None), reverse=True)
    for sec, i, c in timed[:6]:
        first = c.source.strip().splitlines()[0] if c.source.strip() else ""
        lines.append(f"  {sec:7.1f} s  code cell {i:2d}: {first[:70]}")
    return "\n".join(lines)


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"cell {i} has stored outputs; clear them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
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
        print(_timing_report(nb, time.perf_counter() - start))
        pytest.fail(f"a notebook cell failed:\n{err}")
    finally:
        if os.environ.get("SC_VI_EXT_NOTEBOOK_OUT"):
            nbformat.write(nb, os.environ["SC_VI_EXT_NOTEBOOK_OUT"])
    print(_timing_report(nb, time.perf_counter() - start))

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
