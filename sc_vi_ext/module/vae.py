"""The scVI variational autoencoder as a plain torch module that knows nothing of AnnData.

Contract: ``inference(x, batch) -> (mean, log_var)`` gives q(z | x);
``generative(z, batch, log_library) -> dict`` gives the likelihood's parameters;
``log_px_z`` scores counts under them; ``loss`` returns a :class:`LossOutput` with the
per-cell ELBO = E_q[log p(x | z)] - KL(q || p) (Kingma & Welling 2014), p(z) = N(0, I).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import kl_normal_std, log_likelihood
from .nn import Decoder, Encoder

LIKELIHOODS = ("zinb", "nb", "poisson")
DISPERSIONS = ("gene", "gene-batch")


@dataclass
class LossOutput:
    """Per-cell terms of one minibatch (all shaped (cells,), in nats)."""

    reconstruction: torch.Tensor  # one-sample estimate of E_q[log p(x | z)]
    kl: torch.Tensor  # KL(q(z | x) || p(z)), closed form

    @property
    def elbo(self) -> torch.Tensor:
        return self.reconstruction - self.kl

    def loss(self, kl_weight: float) -> torch.Tensor:
        """Mean negative warm-up-weighted ELBO: the quantity the optimiser minimises."""
        return -(self.reconstruction - kl_weight * self.kl).mean()


class VAE(nn.Module):
    """scVI-style VAE on raw counts.

    Parameters mirror :func:`sc_vi_ext.tl.vae`; ``n_batch`` is the number of batch
    categories (0 or 1 means no batch covariate).
    """

    def __init__(
        self,
        n_genes: int,
        *,
        n_batch: int = 0,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        likelihood: str = "zinb",
        dispersion: str = "gene",
        encode_covariates: bool = False,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")
        if dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion must be one of {DISPERSIONS}, not {dispersion!r}")
        self.n_genes, self.n_latent, self.likelihood, self.dispersion = n_genes, n_latent, likelihood, dispersion
        self.n_batch = n_batch if n_batch > 1 else 0
        self.encode_covariates = encode_covariates
        self.encoder = Encoder(
            n_genes, n_latent, n_cat=self.n_batch if encode_covariates else 0,
            n_hidden=n_hidden, n_layers=n_layers, dropout=dropout,
        )
        self.decoder = Decoder(
            n_latent, n_genes, n_cat=self.n_batch, n_hidden=n_hidden, n_layers=n_layers,
            zero_inflated=likelihood == "zinb",
        )
        if likelihood != "poisson":
            n_disp = max(self.n_batch, 1) if dispersion == "gene-batch" else 1
            self.log_theta = nn.Parameter(torch.randn(n_disp, n_genes))

    def _one_hot(self, batch: torch.Tensor | None) -> torch.Tensor | None:
        if not self.n_batch or batch is None:
            return None
        return F.one_hot(batch.long(), self.n_batch).to(torch.get_default_dtype())

    def inference(self, x: torch.Tensor, batch: torch.Tensor | None = None):
        """Mean and log-variance of q(z | x), each (cells, n_latent)."""
        cat = self._one_hot(batch) if self.encode_covariates else None
        return self.encoder(x, cat)

    def generative(self, z: torch.Tensor, batch: torch.Tensor | None, log_library: torch.Tensor) -> dict:
        """Likelihood parameters for latent ``z`` of shape (..., cells, n_latent).

        ``log_library`` is (cells,) log total counts; returns ``mu`` (..., cells, genes),
        ``theta`` (genes,) or (cells, genes), and ``zi_logits`` or None.
        """
        log_scale, zi = self.decoder(z, self._one_hot(batch))
        out = {"mu": torch.exp(log_scale + log_library[:, None]), "zi_logits": zi, "theta": None}
        if self.likelihood != "poisson":
            if self.log_theta.shape[0] == 1:
                out["theta"] = torch.exp(self.log_theta[0])
            else:
                out["theta"] = torch.exp(self.log_theta)[batch.long()]
        return out

    def log_px_z(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """log p(x | z) summed over genes, (..., cells)."""
        return log_likelihood(x, self.likelihood, params["mu"], params["theta"], params["zi_logits"])

    def forward(self, x, batch, log_library, generator: torch.Generator | None = None) -> LossOutput:
        """The per-cell loss terms (``forward`` so that DistributedDataParallel can wrap it)."""
        return self.loss(x, batch, log_library, generator=generator)

    def loss(self, x, batch, log_library, *, generator: torch.Generator | None = None) -> LossOutput:
        """One-sample reparameterised ELBO terms for a minibatch."""
        mean, log_var = self.inference(x, batch)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * log_var) * eps
        rec = self.log_px_z(x, self.generative(z, batch, log_library))
        return LossOutput(reconstruction=rec, kl=kl_normal_std(mean, log_var))
