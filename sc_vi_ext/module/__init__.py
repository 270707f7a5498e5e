"""The torch model: networks, count likelihoods and the VAE (no AnnData in here)."""

from .distributions import (
    CountDistribution,
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    count_distribution,
    kl_normal,
    kl_normal_std,
    log_likelihood,
    log_nb,
    log_normal,
    log_normal_std,
    log_poisson,
    log_zinb,
    reparameterize,
)
from .vae import DISPERSIONS, LATENT_DISTRIBUTIONS, LIBRARIES, LIKELIHOODS, VAE, LossOutput

__all__ = [
    "DISPERSIONS", "LATENT_DISTRIBUTIONS", "LIBRARIES", "LIKELIHOODS", "VAE", "LossOutput",
    "kl_normal", "kl_normal_std", "log_likelihood", "log_nb", "log_normal", "log_normal_std", "log_poisson", "log_zinb",
    "reparameterize", "CountDistribution", "Poisson", "NegativeBinomial", "ZeroInflatedNegativeBinomial",
    "count_distribution",
]
