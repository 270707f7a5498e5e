"""Plots: training curves, latent embeddings and inference diagnostics."""

from ._elbo import elbo
from ._latent import latent

__all__ = ["elbo", "latent"]
