"""The inference fast path ``module.scoring.LogPxGivenZ`` against the model's own log p(x | z)."""

from __future__ import annotations

import pytest
import torch

from sc_vi_ext.module import VAE
from sc_vi_ext.module.scoring import LogPxGivenZ

CASES = {
    "zinb": {},
    "nb": {"likelihood": "nb"},
    "poisson": {"likelihood": "poisson"},
    "gene-batch": {"dispersion": "gene-batch", "n_batch": 3},
    "gene-cell": {"dispersion": "gene-cell"},
    "latent-library": {"library": "latent", "n_batch": 3},
    "logistic-normal-covariates": {"latent_distribution": "ln", "n_batch": 3, "n_cov": 2, "n_layers": 2},
}


def _setup(options, seed=0):
    torch.manual_seed(seed)
    module = VAE(25, n_hidden=16, **options).eval()  # float32: the networks cast to it
    for p in module.parameters():  # non-trivial weights: trained models have spread-out logits
        p.data.add_(torch.randn_like(p) * 0.3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(9, 25, generator=gen) * 4, generator=gen)
    x[torch.rand(9, 25, generator=gen) < 0.5] = 0
    batch = torch.randint(0, 3, (9,), generator=gen) if module.n_batch else None
    cov = torch.randn(9, module.n_cov, generator=gen) if module.n_cov else None
    log_library = torch.log(x.sum(1) + 1)
    z = torch.randn(4, 9, module.latent_dim, generator=gen)
    if module.library == "latent":
        z[..., -1] += 4
    return module, x, batch, log_library, cov, z


def _reference(module, x, batch, log_library, cov, z):
    return module.log_px_z(x, module.generative(z, batch, log_library, cov))


@pytest.mark.parametrize("name", list(CASES))
def test_scorer_equals_model_value_and_gradient(name):
    module, x, batch, log_library, cov, z = _setup(CASES[name])
    for p in module.parameters():
        p.requires_grad_(False)  # as in the diagnostics: weights frozen, the gradient in z wanted
    score = LogPxGivenZ(module, x, batch, log_library, cov)
    assert (score.gamma is not None) == (name not in ("poisson", "gene-cell"))  # the fast path is taken
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, ref = score(z1), _reference(module, x, batch, log_library, cov, z2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)
    w = torch.rand(ref.shape)
    (g1,) = torch.autograd.grad((got * w).sum(), z1)
    (g2,) = torch.autograd.grad((ref * w).sum(), z2)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # forward only (the IWAE), and a subset of the rows (the q* optimiser's active cells)
        cells = torch.tensor([0, 3, 4, 8])
        sub = (None if batch is None else batch[cells], log_library[cells], None if cov is None else cov[cells])
        torch.testing.assert_close(score.subset(cells)(z[:, cells]),
                                   _reference(module, x[cells], sub[0], sub[1], sub[2], z[:, cells]),
                                   rtol=1e-5, atol=1e-3)


def test_scorer_leaves_dispersion_gradients_to_the_model():
    """With weights that require gradients (training) the model's own path runs: theta gets its gradient."""
    module, x, batch, log_library, cov, z = _setup({})
    score = LogPxGivenZ(module, x, batch, log_library, cov)
    (g,) = torch.autograd.grad(score(z).sum(), module.log_theta)
    (g_ref,) = torch.autograd.grad(_reference(module, x, batch, log_library, cov, z).sum(), module.log_theta)
    torch.testing.assert_close(g, g_ref)
    assert g.abs().sum() > 0
