"""log p(x | z) of one minibatch of counts for many latent samples z: the inference fast path.

The diagnostics (the q* optimiser, the IWAE and ELBO estimates) score the same cells under
hundreds of latent samples with the weights frozen. With a dispersion that does not depend
on z ("gene", "gene-batch"), the gamma-function terms of the NB / ZINB likelihood are then
the same for every sample and are computed once per minibatch, and the decoder's logits go
straight into :func:`~sc_vi_ext.module.dense.nb_from_logits` (softmax, library size and
the dense terms in one, gradient written out). Everything else (Poisson, a per-cell
dispersion, weights that require gradients) takes the model's own path,
``module.log_px_z(x, module.generative(z, ...))``, which the fast path equals (tested, value
and gradient in z).
"""

from __future__ import annotations

import torch

from .dense import nb_from_logits
from .distributions import nonzeros
from .fused import nb_gamma_terms
from .vae import VAE


class LogPxGivenZ:
    """``scorer(z)``: log p(x | z) summed over genes, (..., cells), for z of shape (..., cells, latent_dim)."""

    def __init__(self, module: VAE, x: torch.Tensor, batch: torch.Tensor | None, log_library: torch.Tensor,
                 cov: torch.Tensor | None = None, nz=None, *, _gamma: torch.Tensor | None = None):
        self.module, self.x, self.batch, self.log_library, self.cov = module, x, batch, log_library, cov
        self.nz = nonzeros(x) if nz is None else nz
        self.theta = self.gamma = None
        if module.likelihood != "poisson" and module.dispersion != "gene-cell" and self._theta_frozen():
            with torch.no_grad():
                lt = module.log_theta
                self.theta = torch.exp(lt[0]) if lt.shape[0] == 1 else torch.exp(lt)[batch.long()]
                self.gamma = nb_gamma_terms(self.theta, self.nz, x.shape) if _gamma is None else _gamma

    def _theta_frozen(self) -> bool:
        """Whether no gradient can reach the dispersion (the fast path has none for it)."""
        return not (torch.is_grad_enabled() and self.module.log_theta.requires_grad)

    def subset(self, cells: torch.Tensor) -> LogPxGivenZ:
        """Return the scorer of the rows ``cells`` (the per-minibatch constants are reused)."""
        def take(t):
            return None if t is None else t[cells]

        gamma = None if self.gamma is None else self.gamma[cells]
        return LogPxGivenZ(self.module, self.x[cells], take(self.batch), self.log_library[cells], take(self.cov),
                           _gamma=gamma)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.gamma is None or not self._theta_frozen():
            return m.log_px_z(self.x, m.generative(z, self.batch, self.log_library, self.cov), self.nz)
        log_library = z[..., -1] if m.library == "latent" else self.log_library
        logits, zi, _ = m.decoder.heads(m.representation(z), m.covariates(self.batch, self.cov))
        return nb_from_logits(self.x, logits, log_library, self.theta, zi if m.likelihood == "zinb" else None) \
            + self.gamma
