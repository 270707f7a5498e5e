"""Plots: training curves, latent embeddings and inference diagnostics."""

from ._coverage import reference_coverage
from ._elbo import elbo
from ._gap import amortization_gap
from ._gap_history import gap_history
from ._latent import latent
from ._ppc import posterior_predictive

__all__ = ["amortization_gap", "elbo", "gap_history", "latent", "posterior_predictive", "reference_coverage"]
