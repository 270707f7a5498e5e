"""Shared fixtures: tiny simulated data and one small trained model for the whole session."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import scanpy as sc  # noqa: E402
import torch  # noqa: E402

import sc_vi_ext as sv  # noqa: E402

sc.settings.verbosity = 0
# The test models are tiny: intra-op threads only add synchronisation, and on a busy 2-core
# machine they made a 20-epoch training 10-30x slower (0.5 s with 1 thread, 3-14 s with 2).
torch.set_num_threads(1)

# small settings for every training in the suite: the properties tested do not need the defaults
FAST = {"max_epochs": 20, "n_hidden": 32, "progress": False}


@pytest.fixture(scope="session")
def fast():
    """Keyword arguments of ``sv.tl.vae`` for a quick training (copy before changing)."""
    return dict(FAST)


@pytest.fixture(scope="session")
def sim_session():
    """200 cells x 60 genes of simulated counts (2 batches, 5 types); never mutate it."""
    return sv.datasets.simulate(200, 60, random_state=0)


@pytest.fixture
def sim(sim_session):
    """A fresh copy of the simulated counts, free to modify."""
    return sim_session.copy()


@pytest.fixture(scope="session")
def trained_session(sim_session):
    """The simulated data after ``sv.tl.vae`` (20 epochs, 32 hidden units); never mutate it."""
    return sv.tl.vae(sim_session, copy=True, **FAST)


@pytest.fixture
def trained(trained_session):
    """A fresh copy of the trained AnnData, free to modify."""
    return trained_session.copy()


@pytest.fixture(autouse=True)
def _one_thread_and_close_figures():
    # sc.pp.neighbors resets torch's thread count to the number of cores (seen with
    # scanpy 1.11 / torch 2.13): set it again so that every test trains alike
    torch.set_num_threads(1)
    yield
    plt.close("all")


@pytest.fixture
def unchanged():
    """``check = unchanged(adata)`` records the slots of ``adata``; ``check()`` asserts none changed since."""
    import numpy as np
    import scipy.sparse as sp

    def state(adata):
        X = adata.X
        X = X.toarray() if sp.issparse(X) else np.array(X, copy=True)
        return {"shape": adata.shape, "X": X, **{a: sorted(k for k in getattr(adata, a).keys() if k is not None)
                                                  for a in ("obs", "var", "obsm", "obsp", "uns", "layers", "varm")},
                **{f"uns[{k}]": sorted(v) for k, v in adata.uns.items() if isinstance(v, dict)}}

    def record(adata):
        before = state(adata)

        def check():
            now = state(adata)
            np.testing.assert_array_equal(now.pop("X"), before["X"])
            assert now == {k: v for k, v in before.items() if k != "X"}

        return check

    return record


@pytest.fixture
def no_training(monkeypatch):
    """tl.vae that fails the test when called: the command must stop before any work."""
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(sv.tl, "vae", fail)
