"""Inference diagnostics: ELBO and IWAE bounds, the per-cell optimum q*, and the gaps."""

from .bounds import elbo_paired, iwae
from .gaps import COLUMNS, decompose, summarize
from .optimize import QStar, optimize_q

__all__ = ["COLUMNS", "QStar", "decompose", "elbo_paired", "iwae", "optimize_q", "summarize"]
