"""Unusual data that trains or is refused up front: non-canonical CSR, duplicate names, batches
without training cells, counts in ``adata.raw``, numbers that cannot be estimated, plots that
need an embedding. README.md, "Bad input", lists the same cases."""

from __future__ import annotations

import pytest

import sc_vi_ext as sv


def test_latent_with_a_missing_basis_writes_nothing(trained, unchanged):
    check = unchanged(trained)
    with pytest.raises(KeyError, match=r"X_pca.*not found"):
        sv.pl.latent(trained, basis="pca", show=False)
    check()
    assert "neighbors" not in trained.uns and not len(trained.obsp)
