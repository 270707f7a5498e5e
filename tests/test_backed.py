"""Out-of-core training on an AnnData opened with backed="r"."""

from __future__ import annotations

import anndata as ad
import numpy as np

import sc_vi_ext as sv
from sc_vi_ext import dataloader, inputs


def test_backed_matches_in_memory_and_reads_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(dataloader, "BACKED_CHUNK_ROWS", 64)  # several windows on tiny data
    adata = sv.datasets.simulate(300, 40, random_state=0)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    kw = {"max_epochs": 4, "n_hidden": 16, "progress": False}
    sv.tl.vae(backed, **kw)
    sv.tl.vae(adata, **kw)
    assert backed.isbacked and backed.obsm["X_vae"].shape == (300, 10)
    # same cells, same model family: the bounds agree closely (the minibatch order differs)
    h_b, h_m = backed.uns["vae"]["history"], adata.uns["vae"]["history"]
    np.testing.assert_allclose(h_b["elbo_validation"][-1], h_m["elbo_validation"][-1], rtol=0.05)
    # every training cell is seen exactly once per epoch, in windows of consecutive rows
    X = inputs.get_counts(backed, None)
    idx = np.setdiff1d(np.arange(300), backed.obs_names.get_indexer(backed.uns["vae"]["validation_obs_names"]))
    lib = np.zeros(300, np.float32)
    mbs = dataloader.Minibatches(X, idx, log_library=lib, batch_size=32, shuffle=True, rng=np.random.default_rng(0))
    seen = np.concatenate([mb.idx for mb in mbs])
    np.testing.assert_array_equal(np.sort(seen), idx)
    # the steps of a pass are what len() says (the KL warm-up and the compile rule count them)
    assert sum(1 for _ in mbs) == len(mbs) > len(idx) // 32
    for mb in mbs:
        dense = adata.X[mb.idx].toarray()
        np.testing.assert_array_equal(mb.x.numpy(), dense)
        assert mb.idx.max() - mb.idx.min() < 64  # one window at a time
    # the results can be written after the fact
    backed.to_memory().write_h5ad(tmp_path / "out.h5ad")
    assert "X_vae" in ad.read_h5ad(tmp_path / "out.h5ad").obsm


def test_tools_on_a_subset_read_only_its_rows(tmp_path, monkeypatch):
    """A stored model applied to a few cells of a backed AnnData reads those rows, not the file
    (the library sizes come from the minibatch itself), and gives the in-memory result."""
    adata = sv.datasets.simulate(2000, 30, random_state=0)
    sv.tl.vae(adata, max_epochs=1, n_hidden=8, progress=False)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    cls = type(inputs.get_counts(backed, None))
    getitem, read = cls.__getitem__, []

    def counting_getitem(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        read.append(len(range(*rows.indices(self.shape[0]))) if isinstance(rows, slice) else np.size(rows))
        return getitem(self, key)

    monkeypatch.setattr(cls, "__getitem__", counting_getitem)
    cells = np.arange(5, 2000, 100)  # 20 cells spread over the file
    sv.tl.log_likelihood(backed, subset=cells, n_samples=8, progress=False)
    # each needed row at most twice (a check pass and the minibatches), never the other 1,980
    assert 0 < sum(read) <= 2 * len(cells)
    log_px = backed.obs["vae_log_px"].to_numpy()[cells]
    read.clear()
    sv.tl.amortization_gap(backed, n_cells=20, max_steps=5, progress=False)
    assert 0 < sum(read) <= 2 * 20
    monkeypatch.setattr(cls, "__getitem__", getitem)
    sv.tl.log_likelihood(adata, subset=cells, n_samples=8, progress=False)
    np.testing.assert_allclose(log_px, adata.obs["vae_log_px"].to_numpy()[cells], rtol=1e-5)


def test_row_totals_of_a_subset(tmp_path):
    adata = sv.datasets.simulate(500, 20, random_state=1)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    full = np.asarray(adata.X.sum(axis=1)).ravel()
    rows = np.array([400, 3, 77, 3, 250])
    for X in (adata.X, adata.X.toarray(), inputs.get_counts(backed, None)):
        got = inputs.row_totals(X, rows=rows)
        np.testing.assert_array_equal(got[rows], full[rows])
        assert np.isnan(np.delete(got, rows)).all()
        np.testing.assert_array_equal(inputs.row_totals(X), full)


def test_rows_come_back_in_the_requested_order(tmp_path):
    """Every reader returns the rows of ``idx`` in the order asked for, whatever the storage.

    h5py reads increasing indices only: the on-disk reader reads them sorted and must put them back.
    """
    adata = sv.datasets.simulate(60, 12, random_state=2)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    dense = adata.X.toarray()
    idx = np.array([41, 3, 57, 0, 22, 9])
    dense_file = ad.AnnData(X=dense, obs=adata.obs, var=adata.var)
    dense_file.write_h5ad(tmp_path / "d.h5ad")
    backed_dense = ad.read_h5ad(tmp_path / "d.h5ad", backed="r")
    storages = {"csr": adata.X, "dense": dense, "backed-csr": inputs.get_counts(backed, None),
                "backed-dense": inputs.get_counts(backed_dense, None)}
    assert type(storages["backed-csr"]).__name__.endswith("CSRDataset")
    assert dataloader.is_on_disk(storages["backed-dense"])  # a dense X on disk stays there
    for name, X in storages.items():
        for round_counts in (False, True):
            np.testing.assert_array_equal(dataloader.rows_dense(X, idx, round_counts=round_counts), dense[idx],
                                          err_msg=name)
        # through the minibatches (with and without gene alignment): each row is the cell it is labelled with
        for gene_index in (None, np.arange(12)[::-1]):
            for shuffle in (False, True):
                mbs = dataloader.Minibatches(X, idx, log_library=None, batch_size=4, shuffle=shuffle,
                                             rng=np.random.default_rng(0), gene_index=gene_index)
                batches = list(mbs)
                cols = slice(None) if gene_index is None else gene_index
                for mb in batches:
                    np.testing.assert_array_equal(mb.x.numpy(), dense[mb.idx][:, cols], err_msg=name)
                np.testing.assert_array_equal(np.sort(np.concatenate([mb.idx for mb in batches])), np.sort(idx))
                if not shuffle:  # unshuffled: the order asked for, also from a file
                    np.testing.assert_array_equal(np.concatenate([mb.idx for mb in batches]), idx, err_msg=name)


def test_backed_dense_trains_without_loading_the_matrix(tmp_path):
    adata = sv.datasets.simulate(200, 30, random_state=1)
    dense = ad.AnnData(X=adata.X.toarray(), obs=adata.obs, var=adata.var)
    dense.write_h5ad(tmp_path / "d.h5ad")
    backed = ad.read_h5ad(tmp_path / "d.h5ad", backed="r")
    kw = {"max_epochs": 3, "n_hidden": 16, "progress": False, "n_threads": 1}
    sv.tl.vae(backed, **kw)
    sv.tl.vae(dense, **kw)
    assert dataloader.is_on_disk(inputs.get_counts(backed, None))
    np.testing.assert_allclose(backed.uns["vae"]["history"]["elbo_validation"][-1],
                               dense.uns["vae"]["history"]["elbo_validation"][-1], rtol=0.05)


def test_a_window_of_one_cell_joins_its_neighbour(tmp_path, monkeypatch):
    """With on-disk data, a window holding fewer than two wanted cells would be a one-cell
    minibatch (BatchNorm cannot train on it): it joins the window before."""
    monkeypatch.setattr(dataloader, "BACKED_CHUNK_ROWS", 64)
    adata = sv.datasets.simulate(129, 20, random_state=0)  # windows of 64, 64 and 1 rows
    adata.write_h5ad(tmp_path / "a.h5ad")
    X = inputs.get_counts(ad.read_h5ad(tmp_path / "a.h5ad", backed="r"), None)
    for shuffle in (True, False):
        mbs = dataloader.Minibatches(X, np.arange(129), log_library=None, batch_size=32, shuffle=shuffle,
                                     rng=np.random.default_rng(0))
        sizes = [len(mb.idx) for mb in mbs]
        assert min(sizes) >= 2 and sum(sizes) == 129 and len(sizes) == len(mbs)
    sv.tl.vae(ad.read_h5ad(tmp_path / "a.h5ad", backed="r"), max_epochs=2, n_hidden=8, batch_size=32, train_size=1.0,
              progress=False)
