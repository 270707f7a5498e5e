"""The counts stored in data/ are the ones sv.datasets.pbmc68k() recovers."""

from pathlib import Path

import anndata as ad
import numpy as np

import sc_vi_ext as sv


def test_data_file_matches_loader():
    stored = ad.read_h5ad(Path(__file__).parents[1] / "data" / "pbmc68k_counts.h5ad")
    fresh = sv.datasets.pbmc68k()
    assert stored.shape == fresh.shape == (700, 765)
    assert (stored.X != fresh.X).nnz == 0
    assert list(stored.obs_names) == list(fresh.obs_names)
    np.testing.assert_array_equal(stored.obs["bulk_labels"].astype(str), fresh.obs["bulk_labels"].astype(str))
