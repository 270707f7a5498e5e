"""The torch module on its own: the encoder's variance floor."""

from __future__ import annotations

import math

import pytest
import torch

from sc_vi_ext.module import VAE

FLOOR = 1e-4  # scvi-tools' minimum variance of q(z | x)


@pytest.mark.parametrize("library", ["observed", "latent"])
def test_encoder_variance_has_a_floor(library):
    """However small the network's raw output, q(z | x) keeps a variance of at least 1e-4.

    Without the floor, a collapsing variance gives log-variances of -30 and below: KL and
    the reparameterisation then blow up or underflow.
    """
    torch.manual_seed(0)
    module = VAE(6, n_latent=3, n_hidden=8, library=library).eval()
    encoders = [module.encoder] + ([module.library_encoder] if library == "latent" else [])
    x = torch.poisson(torch.full((5, 6), 3.0))
    with torch.no_grad():
        for enc in encoders:
            enc.log_var.weight.zero_()
            enc.log_var.bias.fill_(-40.0)  # a variance of e^-40 before the floor
        _, log_var = module.inference(x)
        assert log_var.shape == (5, module.latent_dim)
        torch.testing.assert_close(log_var, torch.full_like(log_var, math.log(FLOOR + math.exp(-40.0))))
        # above the floor the variance is the network's own plus 1e-4: e^0 + 1e-4
        for enc in encoders:
            enc.log_var.bias.fill_(0.0)
        _, log_var = module.inference(x)
        torch.testing.assert_close(log_var, torch.full_like(log_var, math.log(1.0 + FLOOR)))
