"""Tools: train the VAE and diagnose its inference; results go to ``obsm``, ``obs`` and ``uns``."""

from ._vae import vae

__all__ = ["vae"]
