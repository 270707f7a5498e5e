"""Tools: train the VAE and diagnose its inference; results go to ``obsm``, ``obs`` and ``uns``."""

from ._gap import amortization_gap, log_likelihood, refine
from ._vae import vae

__all__ = ["amortization_gap", "log_likelihood", "refine", "vae"]
