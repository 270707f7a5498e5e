"""Tools: train the VAE and diagnose its inference; results go to ``obsm``, ``obs`` and ``uns``."""

from ._coverage import reference_coverage
from ._de import differential_expression
from ._expression import normalized_expression
from ._gap import amortization_gap
from ._log_likelihood import log_likelihood
from ._map import vae_map
from ._ppc import posterior_predictive
from ._refine import refine
from ._trust import trust_score
from ._vae import vae

__all__ = [
    "amortization_gap", "differential_expression", "log_likelihood", "normalized_expression",
    "posterior_predictive", "reference_coverage", "refine", "trust_score", "vae", "vae_map",
]
