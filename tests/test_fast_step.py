"""The training step written out (``module.fast_step``) against autograd on the plain model: value and gradient."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import sc_vi_ext as sv
from sc_vi_ext import train as train_mod
from sc_vi_ext.acceleration import matmul_precision
from sc_vi_ext.module import VAE, fast_step
from sc_vi_ext.module.distributions import nonzeros

CONFIGS = {
    "defaults": {},
    "nb-no-dropout": {"likelihood": "nb", "dropout": 0.0},
    "poisson-batches": {"likelihood": "poisson", "n_batch": 3},
    "gene-batch-2-layers-covariates": {"n_batch": 3, "dispersion": "gene-batch", "n_layers": 2,
                                       "encode_covariates": True, "n_cov": 2},
    "variance-floor": {"log_var_bias": -10.0},  # exp(a) near the 1e-4 floor: its factor e / (e + floor) matters
}


def _minibatch(n=48, g=70, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen) * 3, generator=gen)
    x[0, 0], x[1, 1] = 60.0, 2.5  # past the gamma table; fractional
    batch = torch.arange(n) % 3
    log_lib = torch.log(x.sum(1).clamp_min(1))
    cov = torch.randn(n, 2, generator=gen)
    return x, batch, log_lib, cov


def _both(options, precision, kl_weight=0.7):
    """The plain module's loss and autograd gradient, and the fast step's, from the same state and seed."""
    x, batch, log_lib, cov = _minibatch()
    options = dict(options)
    log_var_bias = options.pop("log_var_bias", None)
    torch.manual_seed(0)
    plain = VAE(x.shape[1], **options).train()
    if log_var_bias is not None:
        plain.encoder.log_var.bias.data.fill_(log_var_bias)
    fast = copy.deepcopy(plain)
    cov = cov if options.get("n_cov") else None
    torch.manual_seed(1)
    with matmul_precision(precision, "cpu"):
        ref = plain.loss(x, batch, log_lib, cov=cov, nz=nonzeros(x))
    ref.loss(kl_weight).backward()
    torch.manual_seed(1)  # the same dropout masks and latent noise
    out = fast_step.elbo_and_grad(fast, x, batch, log_lib, cov=cov, nz=nonzeros(x), kl_weight=kl_weight,
                                  bf16=precision == "bfloat16")
    return plain, ref, fast, out


def _pre_norm_bias(name: str) -> bool:
    """A Linear bias right before a BatchNorm: its gradient is zero up to rounding on both paths."""
    return ".net.layers." in name and name.endswith(".0.bias")


@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_fast_step_equals_autograd_float32(options):
    plain, ref, fast, out = _both(options, "float32")
    assert fast_step.applies(fast, "cpu")
    torch.testing.assert_close(out.reconstruction, ref.reconstruction.detach(), rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(out.kl, ref.kl.detach(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert q.grad is not None, name
        scale = p.grad.abs().max().item()
        if _pre_norm_bias(name):
            assert q.grad.abs().max() < 1e-4 * max(scale, 1.0), name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
    for (name, b), c in zip(plain.named_buffers(), fast.buffers(), strict=True):  # BatchNorm's running statistics
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("options", [CONFIGS["defaults"], CONFIGS["gene-batch-2-layers-covariates"]],
                         ids=["defaults", "gene-batch-2-layers-covariates"])
def test_fast_step_equals_autograd_bfloat16(options, monkeypatch):
    """Every layer in bfloat16, as under autocast: the same values; gradients within bfloat16 rounding."""
    monkeypatch.setattr(fast_step, "MIN_BF16_WEIGHTS", 0)
    plain, ref, fast, out = _both(options, "bfloat16")
    torch.testing.assert_close(out.reconstruction, ref.reconstruction.detach(), rtol=1e-5, atol=1e-2)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        if _pre_norm_bias(name):
            continue
        rel = ((q.grad - p.grad).norm() / p.grad.norm()).item()
        assert rel < 2e-2, (name, rel)


@pytest.mark.parametrize("options", [CONFIGS["defaults"], CONFIGS["gene-batch-2-layers-covariates"]],
                         ids=["defaults", "gene-batch-2-layers-covariates"])
def test_small_layers_in_float32_are_no_less_accurate(options, monkeypatch):
    """The default mix (layers of >= MIN_BF16_WEIGHTS weights in bfloat16, the rest float32; 5000 here, so
    that this 70-gene model's gene-sized layers are the large ones) is at least as close to the float32
    gradient as autocast's all-bfloat16 step."""
    monkeypatch.setattr(fast_step, "MIN_BF16_WEIGHTS", 5000)
    exact, _, _, _ = _both(options, "float32")
    autocast, _, mix, _ = _both(options, "bfloat16")
    assert mix.encoder.net.layers[0][0].weight.numel() >= 5000 > mix.encoder.mean.weight.numel()
    for (name, e), a, m in zip(exact.named_parameters(), autocast.parameters(), mix.parameters(), strict=True):
        if _pre_norm_bias(name):
            continue
        err_mix, err_autocast = ((m.grad - e.grad).norm() / e.grad.norm()).item(), ((a.grad - e.grad).norm()
                                                                                    / e.grad.norm()).item()
        assert err_mix < 1.25 * err_autocast + 2e-3, (name, err_mix, err_autocast)


def test_only_gene_sized_layers_multiply_in_bfloat16():
    products = fast_step._Products(bf16=True)
    assert products.dtype_of(torch.nn.Linear(2000, 128)) == torch.bfloat16
    assert products.dtype_of(torch.nn.Linear(128, 2000)) == torch.bfloat16
    assert products.dtype_of(torch.nn.Linear(128, 10)) == torch.float32
    assert products.dtype_of(torch.nn.Linear(13, 128)) == torch.float32
    assert fast_step._Products(bf16=False).dtype_of(torch.nn.Linear(2000, 128)) == torch.float32


def test_frozen_parameters_get_no_gradient():
    x, batch, log_lib, _ = _minibatch()
    module = VAE(x.shape[1], n_batch=3).train()
    module.encoder.requires_grad_(False)
    fast_step.elbo_and_grad(module, x, batch, log_lib, nz=nonzeros(x))
    assert all(p.grad is None for p in module.encoder.parameters())
    assert all(p.grad is not None for p in module.decoder.parameters())


@pytest.mark.parametrize("options", [{"library": "latent"}, {"latent_distribution": "ln"},
                                     {"dispersion": "gene-cell"}], ids=["latent-library", "ln", "gene-cell"])
def test_fast_step_stands_aside(options):
    assert not fast_step.applies(VAE(20, **options).train(), "cpu")


def test_fast_step_stands_aside_for_the_models_state(monkeypatch):
    """Eval mode, a frozen BatchNorm (query mapping), a gradient hook, another device, the compiled likelihood."""
    module = VAE(20).train()
    assert fast_step.applies(module, "cpu") and train_mod.uses_fast_step(module, "cpu")
    assert not fast_step.applies(module, "cuda")
    assert not fast_step.applies(module.eval(), "cpu")
    module.train().decoder.net.layers[0][1].eval()
    assert not fast_step.applies(module, "cpu")
    module.train()
    handle = module.decoder.scale.weight.register_hook(lambda g: g * 0)
    assert not fast_step.applies(module, "cpu")
    handle.remove()
    monkeypatch.setattr(train_mod.fused, "_mode", "train")
    assert not train_mod.uses_fast_step(module, "cpu")


def test_a_kernel_that_fails_here_leaves_training_to_autograd(sim_session, monkeypatch, caplog):
    """The kernel is tried once before the first written-out step: if it cannot run, the warning says
    so and tl.vae trains through the plain path."""
    from sc_vi_ext.module import counts_kernel, fast_counts

    def broken(*args, **kwargs):
        raise RuntimeError("no numba here")

    monkeypatch.setattr(counts_kernel, "run", broken)
    monkeypatch.setitem(fast_counts._state, "failed", False)
    monkeypatch.setitem(fast_counts._state, "ready", False)
    calls = []
    monkeypatch.setattr(fast_step, "elbo_and_grad", lambda *a, **k: calls.append(1))
    out = sv.tl.vae(sim_session, copy=True, max_epochs=2, n_hidden=16, progress=False)
    assert not calls and np.isfinite(out.obsm["X_vae"]).all()
    assert "kernel is not available here" in caplog.text


def test_training_takes_the_fast_step_with_the_plain_paths_results(sim_session, monkeypatch):
    """tl.vae trains through the fast step; with it switched off, the same trajectory up to float32 rounding."""
    calls = []
    real = fast_step.elbo_and_grad

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    kw = {"max_epochs": 3, "n_hidden": 32, "dropout": 0.1, "precision": "float32", "progress": False,
          "batch_key": "batch", "random_state": 3}
    monkeypatch.setattr(fast_step, "elbo_and_grad", counted)
    fast = sv.tl.vae(sim_session, copy=True, **kw)
    assert calls
    monkeypatch.setattr(train_mod.fast_step, "applies", lambda *a: False)
    n_fast = len(calls)
    plain = sv.tl.vae(sim_session, copy=True, **kw)
    assert len(calls) == n_fast
    np.testing.assert_allclose(fast.uns["vae"]["history"]["elbo_train"], plain.uns["vae"]["history"]["elbo_train"],
                               rtol=1e-4)
    np.testing.assert_allclose(fast.obsm["X_vae"], plain.obsm["X_vae"], atol=2e-3)
