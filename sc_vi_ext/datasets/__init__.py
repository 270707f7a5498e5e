"""Bundled and simulated data: real PBMC counts and NB simulations with known structure."""

from ._pbmc import pbmc68k
from ._simulate import simulate

__all__ = ["pbmc68k", "simulate"]
