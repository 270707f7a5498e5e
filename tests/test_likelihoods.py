"""Count log-likelihoods and Gaussian terms against scipy / torch.distributions / naive formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit

from sc_vi_ext.module.distributions import (
    kl_normal,
    kl_normal_std,
    log_likelihood,
    log_nb,
    log_normal,
    log_normal_std,
    log_poisson,
    log_zinb,
)

N_CELLS, N_GENES, K = 6, 9, 3
# the implementation adds eps = 1e-8 inside its logs; with mu >= 0.05 that moves a per-cell
# sum by far less than this
RTOL, ATOL = 1e-7, 1e-5


def _counts(rng, shape, *, large=False):
    """Counts with many zeros, a row of only zeros, and (optionally) some very large values."""
    x = rng.negative_binomial(2, 0.3, size=shape).astype(np.float64)
    x[rng.random(shape) < 0.5] = 0
    x[1] = 0  # a cell with only zeros
    if large:
        x[2, :4] = [1000, 25_000, 3, 70_000]
    return x


def _case(name):
    """(x, mu, theta, zi_logits) as float64 numpy arrays for a named shape configuration."""
    rng = np.random.default_rng(CASES.index(name))  # str hash() is salted per process
    large = "large" in name
    x = _counts(rng, (N_CELLS, N_GENES), large=large)
    lead = (K,) if "samples" in name else ()
    mu = rng.uniform(0.05, 20.0, lead + (N_CELLS, N_GENES))
    if large:  # large counts with both a matching and a far-off mean
        mu[..., 2, :4] = [900.0, 30_000.0, 0.1, 0.5]
    theta = rng.uniform(0.2, 30.0, (N_CELLS, N_GENES) if "theta2d" in name else (N_GENES,))
    logits = rng.uniform(-3, 3, lead + (N_CELLS, N_GENES))
    return x, mu, theta, logits


CASES = [
    "theta1d",
    "theta2d",
    "samples-theta1d",
    "samples-theta2d",
    "large-theta1d",
    "large-samples-theta2d",
]


def _t(a):
    return torch.as_tensor(a, dtype=torch.float64)


def _scipy_nb(x, mu, theta):
    """Elementwise NB log-pmf with scipy's parametrisation n = theta, p = theta / (theta + mu)."""
    theta = np.broadcast_to(theta, mu.shape)
    return stats.nbinom.logpmf(np.broadcast_to(x, mu.shape), theta, theta / (theta + mu))


@pytest.mark.parametrize("case", CASES)
def test_log_nb_matches_scipy(case):
    x, mu, theta, _ = _case(case)
    got = log_nb(_t(x), _t(mu), _t(theta)).numpy()
    ref = _scipy_nb(x, mu, theta).sum(-1)
    assert got.shape == mu.shape[:-1]
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES)
def test_log_zinb_matches_scipy(case):
    x, mu, theta, logits = _case(case)
    got = log_zinb(_t(x), _t(mu), _t(theta), _t(logits)).numpy()
    pi = expit(logits)
    nb = _scipy_nb(x, mu, theta)
    ref = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log1p(-pi) + nb).sum(-1)
    assert got.shape == mu.shape[:-1]
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["theta1d", "samples-theta1d", "large-theta1d"])
def test_log_poisson_matches_scipy(case):
    x, mu, _, _ = _case(case)
    got = log_poisson(_t(x), _t(mu)).numpy()
    ref = stats.poisson.logpmf(np.broadcast_to(x, mu.shape), mu).sum(-1)
    assert got.shape == mu.shape[:-1]
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("likelihood", "mu", "theta", "logit"),
    [
        ("poisson", 3.0, None, None),
        ("nb", 3.0, 1.5, None),
        ("nb", 40.0, 0.3, None),
        ("zinb", 3.0, 1.5, 2.0),
        ("zinb", 3.0, 1.5, -2.0),
        ("zinb", 0.5, 8.0, 0.0),
    ],
    ids=["poisson", "nb", "nb-overdispersed", "zinb-mostly-dropout", "zinb-little-dropout", "zinb-half"],
)
def test_pmf_sums_to_one(likelihood, mu, theta, logit):
    """Each one-gene distribution is normalised: sum over x of p(x) = 1 (and mean is mu (1 - pi))."""
    xs = torch.arange(0, 3000, dtype=torch.float64)[:, None]  # one cell per count value, one gene
    mu_t = torch.full_like(xs, mu)
    theta_t = None if theta is None else torch.tensor([theta], dtype=torch.float64)
    logit_t = None if logit is None else torch.full_like(xs, logit)
    p = log_likelihood(xs, likelihood, mu_t, theta_t, logit_t).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    pi = 0.0 if logit is None else expit(logit)
    assert (p * xs[:, 0]).sum().item() == pytest.approx(mu * (1 - pi), rel=1e-5)


# --- the sparse fast path against a naive dense formula -------------------------------------


def _naive(x, likelihood, mu, theta=None, logits=None, eps=1e-8):
    """Textbook elementwise log-likelihoods on every entry, summed over genes.

    The same eps as the implementation inside log(mu); log(theta) and log(theta + mu) have
    none (theta > 0)."""
    if likelihood == "poisson":
        return (x * torch.log(mu + eps) - mu - torch.lgamma(x + 1)).sum(-1)
    log_nb = (
        theta * (torch.log(theta) - torch.log(theta + mu))
        + x * (torch.log(mu + eps) - torch.log(theta + mu))
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    if likelihood == "nb":
        return log_nb.sum(-1)
    pi = torch.sigmoid(logits)
    zero = torch.log(pi + (1 - pi) * torch.exp(log_nb))
    return torch.where(x == 0, zero, torch.log1p(-pi) + log_nb).sum(-1)


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("lead", [(), (K,)], ids=["no-sample-axis", "sample-axis"])
def test_fast_path_equals_naive_dense(likelihood, lead):
    """Sparse-ish data (about 70% zeros): the nonzero-gather path gives the dense formula's value."""
    gen = torch.Generator().manual_seed(1)
    cells, genes = 64, 200
    x = torch.poisson(torch.rand(cells, genes, generator=gen, dtype=torch.float64) * 3, generator=gen)
    x[torch.rand(cells, genes, generator=gen, dtype=torch.float64) < 0.6] = 0
    assert 0.6 < (x == 0).double().mean() < 0.85
    mu = torch.rand(*lead, cells, genes, generator=gen, dtype=torch.float64) * 10 + 0.01
    theta = torch.rand(genes, generator=gen, dtype=torch.float64) * 5 + 0.1
    logits = torch.randn(*lead, cells, genes, generator=gen, dtype=torch.float64) * 2
    got = log_likelihood(x, likelihood, mu, theta, logits)
    ref = _naive(x, likelihood, mu, theta, logits)
    assert got.shape == (*lead, cells)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
def test_model_reconstruction_equals_naive(likelihood, sim_session):
    """The VAE's log p(x | z) (float32, as in training) equals the naive formula on its own parameters."""
    from sc_vi_ext.dataloader import Minibatches
    from sc_vi_ext.inputs import get_counts
    from sc_vi_ext.module import VAE

    torch.manual_seed(0)
    X = get_counts(sim_session, None)
    lib = np.log(np.asarray(X.sum(1)).ravel()).astype(np.float32)
    mb = next(iter(Minibatches(X, np.arange(100), log_library=lib, batch_size=100)))
    module = VAE(sim_session.n_vars, n_hidden=16, likelihood=likelihood).eval()
    with torch.no_grad():
        mean, _ = module.inference(mb.x)
        params = module.generative(mean, None, mb.log_library)
        got = module.log_px_z(mb.x, params)
        ref = _naive(mb.x, likelihood, params["mu"], params["theta"], params["zi_logits"])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


def test_log_likelihood_rejects_unknown():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="likelihood"):
        log_likelihood(x, "gaussian", torch.ones(2, 3))


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("theta_shape", [(4,), (3, 4)], ids=["theta1d", "theta2d"])
def test_log_zinb_gradcheck(theta_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([[0.0, 2.0, 0.0, 7.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mu = (torch.rand(3, 4, generator=gen, dtype=torch.float64) * 5 + 0.2).requires_grad_()
    theta = (torch.rand(theta_shape, generator=gen, dtype=torch.float64) * 3 + 0.3).requires_grad_()
    logits = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(log_zinb, (x, mu, theta, logits), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda m, t: log_nb(x, m, t), (mu, theta), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda m: log_poisson(x, m), (mu,), eps=1e-6, atol=1e-6)


def test_log_zinb_gradient_matches_naive():
    """Autograd through the fast path gives the gradient of the textbook formula."""
    gen = torch.Generator().manual_seed(2)
    x = torch.poisson(torch.rand(20, 30, generator=gen, dtype=torch.float64) * 2, generator=gen)
    args = [
        (torch.rand(20, 30, generator=gen, dtype=torch.float64) * 5 + 0.1).requires_grad_(),
        (torch.rand(30, generator=gen, dtype=torch.float64) * 3 + 0.2).requires_grad_(),
        torch.randn(20, 30, generator=gen, dtype=torch.float64).requires_grad_(),
    ]
    g_fast = torch.autograd.grad(log_zinb(x, *args).sum(), args)
    g_ref = torch.autograd.grad(_naive(x, "zinb", *args).sum(), args)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --- Gaussian terms --------------------------------------------------------------------------


def _gauss(seed=0, shape=(5, 4)):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    log_var = torch.randn(shape, generator=gen, dtype=torch.float64)
    z = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    return mean, log_var, z


def test_kl_normal_std_matches_torch():
    mean, log_var, _ = _gauss()
    q = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl_normal_std(mean, log_var), ref, rtol=1e-12, atol=1e-12)
    assert (kl_normal_std(mean, log_var) > 0).all()
    assert kl_normal_std(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0  # q = p


def test_kl_normal_matches_torch():
    mean, log_var, _ = _gauss(3)
    p_mean, p_log_var, _ = _gauss(4)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(p_mean, torch.exp(0.5 * p_log_var))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl_normal(mean, log_var, p_mean, p_log_var), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl_normal(mean, log_var, mean, log_var), torch.zeros(5, dtype=torch.float64))


def test_kl_normal_std_monte_carlo():
    """KL = E_q[log q(z) - log p(z)], estimated from 200,000 draws."""
    mean = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    log_var = torch.tensor([[0.3, -1.2, 0.8]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    z = mean + torch.exp(0.5 * log_var) * torch.randn(200_000, 1, 3, generator=gen, dtype=torch.float64)
    mc = (log_normal(z, mean, log_var) - log_normal_std(z)).mean(0)
    torch.testing.assert_close(mc, kl_normal_std(mean, log_var), rtol=0, atol=0.02)


def test_log_normal_matches_torch():
    mean, log_var, z = _gauss(1)
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * log_var)).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal(z, mean, log_var), ref, rtol=1e-12, atol=1e-12)
    ref_std = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal_std(z), ref_std, rtol=1e-12, atol=1e-12)
    # broadcasting over a leading sample axis, as the importance-sampled bounds use it
    zs = torch.stack([z, z + 1])
    torch.testing.assert_close(log_normal(zs, mean, log_var)[0], ref)


# --- the fast kernels (sc_vi_ext.module.fused) against the direct formulas ---------------------


def test_gamma_table_equals_lgamma_value_and_gradient():
    """Table lookup for small integer counts, lgamma for large and non-integer ones: same value and
    d/dtheta as lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) summed into cells."""
    from sc_vi_ext.module.distributions import nonzeros
    from sc_vi_ext.module.fused import GAMMA_TABLE_SIZE, nb_gamma_terms

    gen = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(40, 25, generator=gen, dtype=torch.float64) * 8, generator=gen)
    x[0, :5] = torch.tensor([GAMMA_TABLE_SIZE, GAMMA_TABLE_SIZE + 1, 500.0, 7.5, 1e5], dtype=torch.float64)
    theta = (torch.rand(25, generator=gen, dtype=torch.float64) * 20 + 0.05).requires_grad_()
    w = torch.rand(40, generator=gen, dtype=torch.float64)  # unequal per-cell weights in the gradient
    got = nb_gamma_terms(theta, nonzeros(x), x.shape)
    ref = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-9)
    g_got, = torch.autograd.grad((got * w).sum(), theta)
    g_ref, = torch.autograd.grad((ref * w).sum(), theta)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-9)


def test_log_factorial_table():
    from sc_vi_ext.module.fused import log_factorial

    x = torch.tensor([1.0, 2.0, 31.0, 32.0, 33.0, 1000.0, 2.5])
    torch.testing.assert_close(log_factorial(x), torch.lgamma(x + 1))


needs_compiler = pytest.mark.skipif(
    not __import__("sc_vi_ext.module.fused", fromlist=["x"]).compile_available(), reason="no C++ compiler"
)


@needs_compiler
@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
def test_compiled_dense_terms_equal_eager(likelihood):
    """The fused (torch.compile) dense terms: same value and gradients as the eager ones, float32."""
    from sc_vi_ext.module import fused

    gen = torch.Generator().manual_seed(4)
    x = torch.poisson(torch.rand(33, 50, generator=gen) * 3, generator=gen)
    log_mu = (torch.randn(33, 50, generator=gen) * 2).requires_grad_()
    theta = (torch.rand(50, generator=gen) * 5 + 0.1).requires_grad_()
    logits = (torch.randn(33, 50, generator=gen) * 3).requires_grad_()
    args = {"zinb": (theta, logits), "nb": (theta,), "poisson": ()}[likelihood]
    inputs = [log_mu, *args]

    def value(compiled):
        with fused.compiled_likelihood("all" if compiled else False):
            return fused.dense_terms(likelihood, x, torch.exp(log_mu), log_mu, *args)

    eager, comp = value(False), value(True)
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-3)
    for a, b in zip(torch.autograd.grad(eager.sum(), inputs), torch.autograd.grad(comp.sum(), inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --- the eager dense kernel (value and gradient written out) against the plain formulas ---------


@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
@pytest.mark.parametrize("theta_shape", [(30,), (12, 30), (3, 12, 30)], ids=["gene", "cell-gene", "sample-cell-gene"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nb_dense_equals_plain_formula(likelihood, theta_shape, dtype):
    """``module.dense.nb_dense``: the value and every gradient of ``fused.dense_zinb`` / ``dense_nb``."""
    from sc_vi_ext.module.dense import nb_dense
    from sc_vi_ext.module.fused import DENSE

    gen = torch.Generator().manual_seed(7)
    x = torch.poisson(torch.rand(12, 30, generator=gen, dtype=dtype) * 3, generator=gen)
    x[torch.rand(12, 30, generator=gen) < 0.5] = 0
    log_mu = (torch.randn(3, 12, 30, generator=gen, dtype=dtype) * 2).requires_grad_()
    theta = (torch.rand(theta_shape, generator=gen, dtype=dtype) * 5 + 0.05).requires_grad_()
    logits = (torch.randn(3, 12, 30, generator=gen, dtype=dtype) * 3).requires_grad_()
    zi = [logits] if likelihood == "zinb" else []
    inputs = [log_mu, theta, *zi]
    w = torch.rand(3, 12, generator=gen, dtype=dtype)  # a weighted sum: grad_out is not all ones

    ref = DENSE[likelihood](x, torch.exp(log_mu), log_mu, theta, *zi)
    got = nb_dense(x, torch.exp(log_mu), log_mu, theta, *(zi or [None]))
    tol = {"rtol": 1e-10, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-3}
    torch.testing.assert_close(got, ref, **tol)
    for a, b in zip(torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs),
                    strict=True):
        torch.testing.assert_close(a, b, **tol)
    # each input alone (the other gradients are skipped, as in the q* optimiser with theta frozen)
    for inp in inputs:
        (a,) = torch.autograd.grad((nb_dense(x, torch.exp(log_mu), log_mu, theta, *(zi or [None])) * w).sum(), inp)
        (b,) = torch.autograd.grad((DENSE[likelihood](x, torch.exp(log_mu), log_mu, theta, *zi) * w).sum(), inp)
        torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():  # no gradient wanted: the value alone
        torch.testing.assert_close(nb_dense(x, torch.exp(log_mu), log_mu, theta, *(zi or [None])), ref.detach(), **tol)


def test_nb_dense_gradcheck():
    from sc_vi_ext.module.dense import nb_dense

    gen = torch.Generator().manual_seed(3)
    x = torch.tensor([[0.0, 2.0, 0.0, 7.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mu = (torch.rand(2, 2, 4, generator=gen, dtype=torch.float64) * 5 + 0.2).requires_grad_()
    log_mu = torch.log(mu.detach()).requires_grad_()  # independent inputs: each gets its own gradient
    theta = (torch.rand(4, generator=gen, dtype=torch.float64) * 3 + 0.3).requires_grad_()
    logits = torch.randn(2, 2, 4, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: nb_dense(x, *a), (mu, log_mu, theta, logits), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda *a: nb_dense(x, *a), (mu, log_mu, theta), eps=1e-6, atol=1e-6)
