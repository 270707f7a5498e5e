"""The fused likelihood kernel (numba) against the plain torch formulas: value and every gradient."""

import numba
import numpy as np
import pytest
import torch

from sc_vi_ext.module import VAE, fast_counts, vecmath
from sc_vi_ext.module.distributions import log_likelihood, nonzeros


def _counts(n, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen) * 3, generator=gen)
    x[0, 0], x[1, 1], x[2, 2], x[3, :] = 50.0, 2.5, 1000.0, 0.0  # past the gamma table, fractional, huge, empty
    return x


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("n_disp", [1, 3], ids=["gene", "gene-batch"])
def test_kernel_equals_plain_formulas(likelihood, n_disp):
    n, g = 40, 150
    x = _counts(n, g)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(n, g, generator=gen, requires_grad=True)
    zi = torch.randn(n, g, generator=gen, requires_grad=True) if likelihood == "zinb" else None
    lib = (torch.rand(n, generator=gen) * 2 + 6).requires_grad_()
    log_theta = torch.randn(n_disp, g, generator=gen, requires_grad=True)
    index = torch.randint(0, n_disp, (n,), generator=gen)
    inputs = [t for t in (logits, zi, lib, log_theta) if t is not None]
    weights = torch.linspace(-1, 2, n)  # a different incoming gradient per cell

    theta = torch.exp(log_theta) if likelihood != "poisson" else None
    fast = fast_counts.log_px_from_logits(likelihood, x, logits, zi, lib, theta, index, nonzeros(x))
    g_fast = torch.autograd.grad((fast * weights).sum(), inputs, allow_unused=True)

    log_mu = torch.log_softmax(logits.double(), -1) + lib.double()[:, None]
    theta64 = torch.exp(log_theta.double())[index] if likelihood != "poisson" else None
    plain = log_likelihood(x.double(), likelihood, torch.exp(log_mu), theta64,
                           None if zi is None else zi.double(), log_mu)
    g_plain = torch.autograd.grad((plain * weights.double()).sum(), inputs, allow_unused=True)

    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    torch.testing.assert_close(fast.double(), plain, rtol=1e-6, atol=2e-3)
    for a, b in zip(g_fast, g_plain, strict=True):
        if b is None:  # Poisson: no dispersion
            assert a is None or not a.abs().any()
            continue
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_model_loss_fast_path_equals_plain_path(monkeypatch):
    """VAE.loss through the kernel equals the plain path, value and parameter gradients, latent library too."""
    x = _counts(32, 60)
    batch = torch.arange(32) % 2
    log_lib = torch.log(x.sum(1).clamp_min(1))
    torch.manual_seed(0)
    module = VAE(60, n_batch=2, dispersion="gene-batch", library="latent")
    module.library_prior_mean.fill_(float(log_lib.mean()))
    results = []
    for disabled in (False, True):
        if disabled:
            monkeypatch.setenv("SC_VI_EXT_NO_NUMBA", "1")
        module.zero_grad()
        torch.manual_seed(2)  # the same dropout masks
        gen = torch.Generator().manual_seed(3)
        out = module.loss(x, batch, log_lib, generator=gen, nz=nonzeros(x))
        (-out.elbo.mean()).backward()
        results.append((out.elbo.detach(), {k: p.grad.clone() for k, p in module.named_parameters()
                                            if p.grad is not None}))
    (e_fast, g_fast), (e_plain, g_plain) = results
    torch.testing.assert_close(e_fast, e_plain, rtol=1e-5, atol=2e-3)
    assert g_fast.keys() == g_plain.keys()
    for k in g_fast:
        torch.testing.assert_close(g_fast[k], g_plain[k], rtol=1e-3, atol=1e-5 + 1e-4 * g_plain[k].abs().max().item())


def test_kernel_is_the_same_on_one_and_two_threads():
    x = _counts(64, 80)
    logits, zi = torch.randn(64, 80), torch.randn(64, 80)
    lib, theta = torch.full((64,), 6.0), torch.rand(1, 80) + 0.5
    before = torch.get_num_threads()
    try:
        vals = []
        for n in (1, 2):
            torch.set_num_threads(n)
            vals.append(fast_counts.log_px_from_logits("zinb", x, logits, zi, lib, theta))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(vals[0], vals[1])


def test_vector_math_is_accurate():
    jit = {**vecmath.JIT, "cache": False}

    @numba.njit(**jit)
    def apply(x, out, which):
        for i in range(x.shape[0]):
            out[i] = vecmath.exp(x[i]) if which == 0 else (vecmath.log(x[i]) if which == 1 else vecmath.log1p(x[i]))

    rng = np.random.default_rng(0)
    cases = [(np.exp, rng.uniform(-80, 80, 20000)), (np.log, np.exp(rng.uniform(-80, 80, 20000))),
             (np.log1p, np.exp(rng.uniform(-30, 15, 20000)))]
    for which, (ref, x) in enumerate(cases):
        x = x.astype(np.float32)
        out = np.empty_like(x)
        apply(x, out, which)
        want = ref(x.astype(np.float64))
        assert np.all(np.abs(out - want) <= 3e-7 * np.maximum(np.abs(want), 1.0 if which == 1 else 0.0) + 1e-38)
