"""The speed options of ``tl.vae``: compiled likelihood and thread count give the eager results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sc_vi_ext as sv
from sc_vi_ext.acceleration import COMPILE_MIN_STEPS, use_compiled
from sc_vi_ext.module import fast_step, fused
from sc_vi_ext.threads import default_threads, threads


@pytest.mark.skipif(not fused.compile_available(), reason="no C++ compiler")
@pytest.mark.parametrize("options", [{}, {"likelihood": "nb", "batch_key": "batch"}], ids=["zinb", "nb-batch"])
def test_compiled_training_equals_eager(sim_session, options):
    """Same seed, compiled or not: the same trajectory up to float32 rounding (the warm-up
    compile leaves no trace in the random streams or BatchNorm statistics)."""
    # dropout 0.1: the small-data default 0.4 amplifies float32 rounding differences faster; float32: the
    # eager run takes the written-out step (module.fast_step), whose bfloat16 products round differently
    kw = {"max_epochs": 3, "n_hidden": 32, "dropout": 0.1, "precision": "float32", "progress": False, **options}
    eager = sv.tl.vae(sim_session, copy=True, compile=False, **kw)
    comp = sv.tl.vae(sim_session, copy=True, compile=True, **kw)
    np.testing.assert_allclose(comp.uns["vae"]["history"]["elbo_train"], eager.uns["vae"]["history"]["elbo_train"],
                               rtol=1e-4)
    np.testing.assert_allclose(comp.obsm["X_vae"], eager.obsm["X_vae"], atol=1e-3)
    assert not fused.compiled_enabled()  # switched off again after training


def test_compile_auto_rule(monkeypatch):
    monkeypatch.setattr(fused, "can_compile", lambda: True)
    assert use_compiled("auto", COMPILE_MIN_STEPS) and use_compiled(True, 1)
    assert not use_compiled("auto", COMPILE_MIN_STEPS - 1)
    # where the fused kernel applies, "auto" never compiles; True still does
    assert not use_compiled("auto", 10**9, kernel=True) and use_compiled(True, 1, kernel=True)
    assert not use_compiled(False, 10**9)
    with pytest.raises(ValueError, match="compile must be"):
        use_compiled("yes", 10)


def test_n_threads_is_applied_and_restored(sim_session, monkeypatch):
    seen = []
    import sc_vi_ext.tl._vae as tlvae

    real_train = tlvae.train

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real_train(*a, **k)

    monkeypatch.setattr(tlvae, "train", spy)
    before = torch.get_num_threads()
    sv.tl.vae(sim_session, copy=True, max_epochs=1, n_hidden=8, progress=False, n_threads=2)
    assert seen == [2]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n_threads"):
        sv.tl.vae(sim_session, copy=True, max_epochs=1, n_threads=0)


def test_default_threads_leaves_busy_cores(monkeypatch):
    import sc_vi_ext.threads as th

    monkeypatch.setattr(th, "available_cpus", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(th, "busy_cpus", lambda: 0.1)
    assert default_threads() == 4
    monkeypatch.setattr(th, "busy_cpus", lambda: 2.9)
    assert default_threads() == 1
    monkeypatch.setattr(th, "busy_cpus", lambda: 9.0)
    assert default_threads() == 1
    monkeypatch.setattr(th, "busy_cpus", lambda: None)
    assert default_threads() == 4
    with threads(1) as n:
        assert n == 1


def test_busy_cpus_measures_now():
    from sc_vi_ext.threads import available_cpus, busy_cpus

    busy = busy_cpus(0.05)
    assert busy is None or -0.01 <= busy <= available_cpus() + 0.01


def test_compiler_failure_falls_back_to_eager(monkeypatch, caplog):
    """A broken compiler must not stop the analysis: a warning, then the eager values."""
    import sc_vi_ext.module.fused as f

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no compiler today")

        return call

    monkeypatch.setattr(f, "_compiled", {})
    monkeypatch.setattr(f.torch, "compile", broken)
    monkeypatch.setattr(f, "compile_available", lambda: True)
    monkeypatch.setattr(f, "_failed", False)
    x = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    mu = torch.tensor([[1.0, 2.0], [0.5, 4.0]])
    with f.compiled_likelihood("all") as on:
        assert on
        got = f.dense_terms("poisson", x, mu, torch.log(mu))
        assert not f.compiled_enabled()
    torch.testing.assert_close(got, f.dense_poisson(x, mu, torch.log(mu)))
    assert "eager" in caplog.text


def test_bfloat16_training_learns_as_float32(sim_session, monkeypatch):
    """precision="bfloat16": the matrix products in bfloat16, all else float32; the model learns
    as much as in float32 (same seed, validation ELBO within 0.5 %)."""
    # every layer of this small model in bfloat16 (by default only those with >= 2^16 weights)
    monkeypatch.setattr(fast_step, "MIN_BF16_WEIGHTS", 0)
    kw = {"max_epochs": 8, "n_hidden": 32, "progress": False, "n_threads": 1}
    f32 = sv.tl.vae(sim_session, copy=True, precision="float32", **kw)
    bf16 = sv.tl.vae(sim_session, copy=True, precision="bfloat16", **kw)
    h32, h16 = f32.uns["vae"]["history"], bf16.uns["vae"]["history"]
    assert h16["elbo_validation"][-1] > h16["elbo_validation"][0] + 5  # it learns
    np.testing.assert_allclose(h16["elbo_validation"][-1], h32["elbo_validation"][-1], rtol=5e-3)
    assert not np.array_equal(bf16.obsm["X_vae"], f32.obsm["X_vae"])  # the option does something
    assert bf16.uns["vae"]["params"]["precision"] == "bfloat16"
    model = sv.get_model(bf16)
    x = torch.as_tensor(sim_session.X[:8].toarray())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast, the likelihood still gets float32
        mean, log_var = model.inference(x)
        params = model.generative(mean, None, torch.log(x.sum(1)))
    assert mean.dtype == log_var.dtype == params["mu"].dtype == params["zi_logits"].dtype == torch.float32


@pytest.mark.parametrize("native", [True, False], ids=["bf16-hardware", "no-bf16-hardware"])
def test_auto_precision_follows_the_hardware(sim_session, monkeypatch, native):
    """precision="auto" (the default) trains in bfloat16 exactly where the CPU multiplies it natively,
    records what ran, and an explicit precision wins."""
    from sc_vi_ext import acceleration

    monkeypatch.setattr(acceleration, "bf16_fast_on_cpu", lambda: native)
    assert acceleration.resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert acceleration.resolve_precision("float32", "cpu") == "float32"
    a = sv.tl.vae(sim_session, copy=True, max_epochs=1, n_hidden=16, progress=False, n_threads=1)
    assert a.uns["vae"]["params"]["precision"] == ("bfloat16" if native else "float32")
    assert np.isfinite(a.obsm["X_vae"]).all()


def test_unknown_precision_is_refused_before_writing(sim_session):
    a = sim_session.copy()
    with pytest.raises(ValueError, match="precision must be one of"):
        sv.tl.vae(a, precision="float16", max_epochs=1, progress=False)
    assert "vae" not in a.uns and "X_vae" not in a.obsm


def test_warnings_point_at_the_callers_line(sim_session, monkeypatch):
    """Warnings from deep inside training name the line of the user's sv.tl.vae call."""
    monkeypatch.setattr(fused, "can_compile", lambda: False)
    with pytest.warns(UserWarning, match="torch.compile is not available") as rec:
        sv.tl.vae(sim_session, copy=True, compile=True, max_epochs=1, n_hidden=16, progress=False)
    assert [w.filename for w in rec if "torch.compile" in str(w.message)] == [__file__]
    from sc_vi_ext.tl._utils import split_indices

    lone = sim_session[:120].copy()
    _, val = split_indices(120, 0.9, np.random.default_rng(0))  # a batch of held-out cells only
    lone.obs["batch"] = np.where(np.isin(np.arange(120), val[:2]), "held_out_only", "b")
    with pytest.warns(UserWarning, match="no training cells") as rec:
        sv.tl.vae(lone, batch_key="batch", max_epochs=1, n_hidden=16, progress=False)
    assert [w.filename for w in rec if "no training cells" in str(w.message)] == [__file__]


def test_thread_count_follows_other_processes_load(monkeypatch):
    """Inside a default-threads block the count drops when another process takes a core and comes back after."""
    from sc_vi_ext import threads as th

    monkeypatch.setattr(th, "available_cpus", lambda: 2)
    monkeypatch.setattr(th, "busy_cpus", lambda seconds=0.1: 0.0)
    monkeypatch.setattr(th, "REBALANCE_SECONDS", 0.0)
    clock = {"idle": 0, "total": 0, "own": 0}
    monkeypatch.setattr(th, "_cpu_times", lambda: (clock["idle"], clock["total"]))
    monkeypatch.setattr(th, "_own_jiffies", lambda: clock["own"])

    def interval(own, others):  # 100 jiffies of 2 CPUs: this process and the others busy for so many
        clock["total"] += 200
        clock["idle"] += 200 - own - others
        clock["own"] += own

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with th.threads(None) as n:
            assert n == 2
            interval(own=100, others=95)  # another process holds a core
            th.rebalance()
            assert torch.get_num_threads() == 1
            interval(own=100, others=2)  # it has ended
            th.rebalance()
            assert torch.get_num_threads() == 2
            with th.threads(1):  # an explicit count wins, ungoverned
                interval(own=100, others=0)
                th.rebalance()
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    th.rebalance()  # outside a block: nothing to do
