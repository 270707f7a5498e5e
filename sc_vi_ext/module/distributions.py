"""Count log-likelihoods summed over genes: the one place each log-probability lives.

All three return log p(x | mean, ...) per cell, in nats, including the -log(x!) term, so
the ELBO built on them is a true lower bound on log p(x) (Lopez et al. 2018, scVI).

Speed (details in :mod:`sc_vi_ext.module.fused`): on sparse single-cell data most counts
are zero, and for x = 0 the terms lgamma(x + theta) - lgamma(theta), x log(mu) and log(x!)
all vanish. The terms that touch every entry are evaluated densely in one (optionally
compiled) pass; the gamma functions only at the non-zeros, by a per-gene table of
sum_{k<x} log(theta + k) for small integer counts. The value equals the textbook formula
(tested against scipy.stats and a naive dense implementation, value and gradient).
"""

from __future__ import annotations

from typing import Literal

import torch

from .fused import LOG_EPS, dense_terms, log_factorial, nb_gamma_terms


def nonzeros(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, columns and values of the non-zero entries of a (cells, genes) count matrix."""
    rows, cols = torch.nonzero(x, as_tuple=True)
    return rows, cols, x[rows, cols]


def log_poisson(x: torch.Tensor, mu: torch.Tensor, log_mu: torch.Tensor | None = None, nz=None) -> torch.Tensor:
    """Poisson log-likelihood summed over genes.

    ``x`` is (cells, genes); ``mu`` is (..., cells, genes); ``log_mu`` (optional, same
    shape) spares a log when the caller has it; ``nz`` = (rows, columns, values) of the
    non-zeros of ``x`` (``nonzeros``) spares a search when the caller has them. Returns (..., cells).
    """
    rows, _, xv = nonzeros(x) if nz is None else nz
    if log_mu is None:
        log_mu = torch.log(mu + LOG_EPS)
    lfact = log_factorial(xv)
    return dense_terms("poisson", x, mu, log_mu) - lfact.new_zeros(x.shape[0]).index_add_(0, rows, lfact)


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, log_mu: torch.Tensor | None = None,
           nz=None) -> torch.Tensor:
    """Negative-binomial log-likelihood (mean ``mu``, inverse dispersion ``theta``).

    NB(x; mu, theta) = Gamma(x + theta) / (Gamma(theta) x!) (theta / (theta + mu))^theta
    (mu / (theta + mu))^x. ``theta`` broadcasts against ``mu``. Returns (..., cells).
    """
    return log_zinb(x, mu, theta, None, log_mu, nz)


def log_zinb(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor | None,
    log_mu: torch.Tensor | None = None,
    nz: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Zero-inflated NB log-likelihood; ``zi_logits`` are the logits of the dropout mass.

    p(x) = pi 1[x = 0] + (1 - pi) NB(x; mu, theta), pi = sigmoid(zi_logits). With
    ``zi_logits=None`` this is the plain NB. ``log_mu`` and ``nz`` as in :func:`log_poisson`.
    Returns (..., cells).

    Split of the work (:mod:`sc_vi_ext.module.fused`): the terms that touch every entry
    (the NB zero mass, x log(mu / (theta + mu)), the zero-inflation mixture) in one dense
    pass, fused by ``torch.compile`` in training when enabled; the gamma functions only on
    the non-zeros, by a per-gene table for small integer counts.
    """
    nz = nonzeros(x) if nz is None else nz
    if log_mu is None:
        log_mu = torch.log(mu + LOG_EPS)
    if zi_logits is None:
        dense = dense_terms("nb", x, mu, log_mu, theta)
    else:
        dense = dense_terms("zinb", x, mu, log_mu, theta, zi_logits)
    return dense + nb_gamma_terms(theta, nz, x.shape)


class CountDistribution:
    """A count likelihood with mean ``mu`` (..., cells, genes); ``log_mu`` spares a log when known.

    ``log_prob(x, nz=None)`` scores counts ``x`` (cells, genes), summed over genes: (..., cells),
    by the fast functions above (``nz``: the non-zeros of ``x`` if known, ``nonzeros``);
    ``sample()`` draws counts of ``mu``'s shape from the global torch RNG.
    """

    def __init__(self, mu: torch.Tensor, log_mu: torch.Tensor | None = None):
        self.mu, self.log_mu = mu, log_mu

    @classmethod
    def from_params(cls, params: dict) -> CountDistribution:
        """Take what the distribution needs from the decoder's parameters (see :func:`count_distribution`)."""
        return cls(params["mu"], params.get("log_mu"))

    def log_prob(self, x: torch.Tensor, nz=None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self) -> torch.Tensor:
        raise NotImplementedError


class Poisson(CountDistribution):
    """Poisson counts with mean ``mu``."""

    def log_prob(self, x: torch.Tensor, nz=None) -> torch.Tensor:
        """Per-cell log-likelihood, summed over genes (``log_poisson``, the fast path)."""
        return log_poisson(x, self.mu, self.log_mu, nz)

    def sample(self) -> torch.Tensor:
        """One draw of counts, shaped as ``mu``."""
        return torch.poisson(self.mu)


class NegativeBinomial(CountDistribution):
    """NB counts with mean ``mu`` and inverse dispersion ``theta`` (broadcasting against ``mu``)."""

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, log_mu: torch.Tensor | None = None):
        super().__init__(mu, log_mu)
        self.theta = theta

    @classmethod
    def from_params(cls, params: dict) -> NegativeBinomial:
        return cls(params["mu"], params["theta"], params.get("log_mu"))

    def log_prob(self, x: torch.Tensor, nz=None) -> torch.Tensor:
        """Per-cell log-likelihood, summed over genes (``log_nb``, the fast path)."""
        return log_zinb(x, self.mu, self.theta, None, self.log_mu, nz)

    def sample(self) -> torch.Tensor:
        """One draw as a Gamma-Poisson mixture: rate ~ Gamma(theta, theta / mu), x ~ Poisson(rate)."""
        theta = self.theta.expand_as(self.mu)
        rate = torch.distributions.Gamma(theta, theta / self.mu.clamp_min(1e-12)).sample()
        return torch.poisson(rate)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """ZINB counts: NB(mu, theta) set to zero with the dropout probability sigmoid(``zi_logits``)."""

    def __init__(self, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor,
                 log_mu: torch.Tensor | None = None):
        super().__init__(mu, theta, log_mu)
        self.zi_logits = zi_logits

    @classmethod
    def from_params(cls, params: dict) -> ZeroInflatedNegativeBinomial:
        return cls(params["mu"], params["theta"], params["zi_logits"], params.get("log_mu"))

    def log_prob(self, x: torch.Tensor, nz=None) -> torch.Tensor:
        """Per-cell log-likelihood, summed over genes (``log_zinb``, the fast path)."""
        return log_zinb(x, self.mu, self.theta, self.zi_logits, self.log_mu, nz)

    def sample(self) -> torch.Tensor:
        """One NB draw, then each count set to zero with probability sigmoid(zi_logits)."""
        x = super().sample()
        dropout = torch.rand_like(self.mu) < torch.sigmoid(self.zi_logits)
        return x.masked_fill(dropout, 0.0)


Likelihood = Literal["zinb", "nb", "poisson"]
COUNT_DISTRIBUTIONS: dict[str, type[CountDistribution]] = {
    "zinb": ZeroInflatedNegativeBinomial, "nb": NegativeBinomial, "poisson": Poisson,
}


def count_distribution(likelihood: Likelihood, params: dict) -> CountDistribution:
    """Return the count distribution named ``likelihood`` ("zinb", "nb" or "poisson") with the decoder's ``params``.

    ``params`` is what :meth:`~sc_vi_ext.module.VAE.generative` returns (``mu``, ``log_mu``,
    ``theta``, ``zi_logits``); each distribution takes the entries it needs.
    """
    if likelihood not in COUNT_DISTRIBUTIONS:
        raise ValueError(f"likelihood must be one of {tuple(COUNT_DISTRIBUTIONS)}, not {likelihood!r}.")
    return COUNT_DISTRIBUTIONS[likelihood].from_params(params)


def log_likelihood(
    x: torch.Tensor,
    likelihood: Likelihood,
    mu: torch.Tensor,
    theta: torch.Tensor | None = None,
    zi_logits: torch.Tensor | None = None,
    log_mu: torch.Tensor | None = None,
    nz: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Log-likelihood of ``likelihood`` in {"zinb", "nb", "poisson"}; per-cell sum over genes."""
    params = {"mu": mu, "theta": theta, "zi_logits": zi_logits, "log_mu": log_mu}
    return count_distribution(likelihood, params).log_prob(x, nz)


def reparameterize(mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Draw from N(mean, diag(exp(log_var))) given standard-normal noise ``eps``: mean + sigma * eps.

    ``eps`` may carry leading sample axes, (..., cells, latent_dim); the draws have its shape.
    """
    return mean + torch.exp(0.5 * log_var) * eps


def log_normal_std(z: torch.Tensor) -> torch.Tensor:
    """Log N(z; 0, I) summed over the last axis."""
    return log_normal(z, torch.zeros_like(z), torch.zeros_like(z))


def log_normal(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Log N(z; mean, diag(exp(log_var))) summed over the last axis."""
    two_pi = torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype))
    return -0.5 * ((z - mean).pow(2) * torch.exp(-log_var) + log_var + two_pi).sum(-1)


def kl_normal(mean, log_var, p_mean, p_log_var) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(p_mean, exp(p_log_var))) in closed form, summed over the last axis."""
    return 0.5 * (
        (torch.exp(log_var) + (mean - p_mean).pow(2)) * torch.exp(-p_log_var) - 1.0 + p_log_var - log_var
    ).sum(-1)


def kl_normal_std(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)), summed over the last axis."""
    return kl_normal(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
