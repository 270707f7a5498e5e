"""The scVI variational autoencoder as a plain torch module that knows nothing of AnnData.

Contract: ``inference(x, batch, cov) -> (mean, log_var)`` gives q(z | x);
``generative(z, batch, log_library, cov) -> dict`` gives the likelihood's parameters;
``log_px_z`` scores counts under them; ``loss`` returns a :class:`LossOutput` with the
per-cell ELBO = E_q[log p(x | z)] - KL(q || p) (Kingma & Welling 2014), p(z) = N(0, I);
``prior``, ``kl`` and ``log_prior`` give the prior of the whole latent variable.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_counts, fused
from .distributions import Likelihood, count_distribution, kl_normal, log_normal, reparameterize
from .nn import Decoder, Encoder

Dispersion = Literal["gene", "gene-batch", "gene-cell"]
Library = Literal["observed", "latent"]
LatentDistribution = Literal["normal", "ln"]
LIKELIHOODS = get_args(Likelihood)
DISPERSIONS = get_args(Dispersion)
LIBRARIES = get_args(Library)
LATENT_DISTRIBUTIONS = get_args(LatentDistribution)
OPTIONS = {"likelihood": LIKELIHOODS, "dispersion": DISPERSIONS, "library": LIBRARIES,
           "latent_distribution": LATENT_DISTRIBUTIONS}


def check_options(**options: str) -> None:
    """Raise a ValueError naming the first of the VAE's ``OPTIONS`` that is not one of its allowed values."""
    for name, value in options.items():
        if value not in OPTIONS[name]:
            raise ValueError(f"{name} must be one of {OPTIONS[name]}, not {value!r}.")


@dataclass
class LossOutput:
    """Per-cell terms of one minibatch (all shaped (cells,), in nats)."""

    reconstruction: torch.Tensor  # one-sample estimate of E_q[log p(x | z)]
    kl: torch.Tensor  # KL(q(z | x) || p(z)), closed form

    @property
    def elbo(self) -> torch.Tensor:
        return self.reconstruction - self.kl

    def loss(self, kl_weight: float) -> torch.Tensor:
        """Mean negative warm-up-weighted ELBO: the quantity the optimiser minimises."""
        return -(self.reconstruction - kl_weight * self.kl).mean()


class VAE(nn.Module):
    """scVI-style VAE on raw counts.

    Parameters mirror :func:`sc_vi_ext.tl.vae`; ``n_batch`` is the number of batch
    categories (0 or 1 means no batch covariate); ``n_cov`` the width of the extra
    covariate design ``cov`` (one-hot categorical and continuous covariates), which is
    concatenated to the batch one-hot wherever covariates enter a network.

    The latent variable has ``latent_dim`` dimensions: the ``n_latent`` of z, plus one for
    the log library size when ``library="latent"`` (its prior is a per-batch normal whose
    mean and variance are set from the data in the buffers ``library_prior_*``). The
    prior of z is N(0, I); with ``latent_distribution="ln"`` the decoder sees softmax(z)
    (a logistic-normal latent). Every diagnostic treats the whole latent variable alike.

    Every constructor argument is kept as an attribute of the same name and all of them
    together in :attr:`hparams`; the options are checked here (``check_options``), and
    the defaults here are the tool's (``DEFAULTS``).
    """

    def __init__(
        self,
        n_genes: int,
        *,
        n_batch: int = 0,
        n_cov: int = 0,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        likelihood: Likelihood = "zinb",
        dispersion: Dispersion = "gene",
        encode_covariates: bool = False,
        library: Library = "observed",
        latent_distribution: LatentDistribution = "normal",
    ):
        super().__init__()
        check_options(likelihood=likelihood, dispersion=dispersion, library=library,
                      latent_distribution=latent_distribution)
        self.n_genes, self.n_batch, self.n_cov = n_genes, n_batch if n_batch > 1 else 0, n_cov
        self.n_latent, self.n_hidden, self.n_layers, self.dropout = n_latent, n_hidden, n_layers, dropout
        self.likelihood, self.dispersion, self.encode_covariates = likelihood, dispersion, encode_covariates
        self.library, self.latent_distribution = library, latent_distribution
        n_cat = self.n_batch + n_cov
        self.latent_dim = n_latent + (library == "latent")
        enc = {"n_cat": n_cat if encode_covariates else 0, "n_hidden": n_hidden, "dropout": dropout}
        self.encoder = Encoder(n_genes, n_latent, n_layers=n_layers, **enc)
        # scvi-tools' library encoder: one hidden layer of its own
        self.library_encoder = Encoder(n_genes, 1, n_layers=1, **enc) if library == "latent" else None
        self.decoder = Decoder(
            n_latent, n_genes, n_cat=n_cat, n_hidden=n_hidden, n_layers=n_layers,
            zero_inflated=likelihood == "zinb", cell_dispersion=dispersion == "gene-cell" and likelihood != "poisson",
        )
        if likelihood != "poisson" and dispersion != "gene-cell":
            n_disp = max(self.n_batch, 1) if dispersion == "gene-batch" else 1
            self.log_theta = nn.Parameter(torch.randn(n_disp, n_genes))
        n_lib = max(self.n_batch, 1)
        self.register_buffer("library_prior_mean", torch.zeros(n_lib))
        self.register_buffer("library_prior_log_var", torch.zeros(n_lib))

    @property
    def hparams(self) -> dict:
        """The constructor's arguments by name; ``VAE(**module.hparams)`` builds the same architecture."""
        return {name: getattr(self, name) for name in HPARAMS}

    def covariates(self, batch: torch.Tensor | None, cov: torch.Tensor | None) -> torch.Tensor | None:
        """Network input for the covariates: batch one-hot, then the extra design ``cov``."""
        parts = []
        if self.n_batch and batch is not None:
            parts.append(F.one_hot(batch.long(), self.n_batch).to(torch.get_default_dtype()))
        if self.n_cov:
            if cov is None:
                raise ValueError(f"This model was trained with {self.n_cov} covariate columns; pass `cov`.")
            parts.append(cov)
        return torch.cat(parts, -1) if len(parts) > 1 else (parts[0] if parts else None)

    def inference(self, x: torch.Tensor, batch: torch.Tensor | None = None, cov: torch.Tensor | None = None):
        """Mean and log-variance of q(latent | x), each (cells, latent_dim)."""
        cat = self.covariates(batch, cov) if self.encode_covariates else None
        mean, log_var = self.encoder(x, cat)
        if self.library_encoder is not None:
            l_mean, l_log_var = self.library_encoder(x, cat)
            mean, log_var = torch.cat([mean, l_mean], -1), torch.cat([log_var, l_log_var], -1)
        return mean, log_var

    def prior(self, batch: torch.Tensor | None, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the Gaussian prior of the latent variable, (cells, latent_dim)."""
        dev = self.library_prior_mean.device
        mean = torch.zeros(n_cells, self.latent_dim, device=dev)
        log_var = torch.zeros_like(mean)
        if self.library == "latent":
            b = (torch.zeros(n_cells, dtype=torch.long, device=dev) if batch is None or not self.n_batch
                 else batch.long())
            mean[:, -1] = self.library_prior_mean[b]
            log_var[:, -1] = self.library_prior_log_var[b]
        return mean, log_var

    def kl(self, mean, log_var, batch) -> torch.Tensor:
        """KL(q || p) in closed form, (cells,)."""
        return kl_normal(mean, log_var, *self.prior(batch, mean.shape[0]))

    def log_prior(self, z, batch) -> torch.Tensor:
        """Log p(latent) for samples ``z`` of shape (..., cells, latent_dim)."""
        return log_normal(z, *self.prior(batch, z.shape[-2]))

    def representation(self, mean: torch.Tensor) -> torch.Tensor:
        """Return the latent coordinates written to ``obsm``: the mean of z (softmax-ed for "ln")."""
        z = mean[..., : self.n_latent]
        return torch.softmax(z, -1) if self.latent_distribution == "ln" else z

    def generative(self, z: torch.Tensor, batch: torch.Tensor | None, log_library: torch.Tensor,
                   cov: torch.Tensor | None = None) -> dict:
        """Likelihood parameters for latent samples ``z`` of shape (..., cells, latent_dim).

        ``log_library`` is (cells,) log observed library size (ignored with a latent
        library); returns ``mu`` (..., cells, genes), ``theta`` (genes,), (cells, genes) or
        (..., cells, genes), and ``zi_logits`` or None.
        """
        if self.library == "latent":
            log_library = z[..., -1]
        log_scale, zi, cell_log_theta = self.decoder(self.representation(z), self.covariates(batch, cov))
        log_mu = log_scale + log_library[..., None]
        out = {"mu": torch.exp(log_mu), "log_mu": log_mu, "zi_logits": zi, "theta": None}
        if cell_log_theta is not None:
            out["theta"] = torch.exp(cell_log_theta)
        elif self.likelihood != "poisson":
            if self.log_theta.shape[0] == 1:
                out["theta"] = torch.exp(self.log_theta[0])
            else:
                out["theta"] = torch.exp(self.log_theta)[batch.long()]
        return out

    def scale(self, z: torch.Tensor, batch: torch.Tensor | None, cov: torch.Tensor | None = None) -> torch.Tensor:
        """Gene proportions (the decoder's softmax) for latent samples ``z``: normalised expression."""
        return torch.exp(self.decoder(self.representation(z), self.covariates(batch, cov))[0])

    def log_px_z(self, x: torch.Tensor, params: dict, nz=None) -> torch.Tensor:
        """Log p(x | z) summed over genes, (..., cells); ``nz``: x's non-zeros if known."""
        return count_distribution(self.likelihood, params).log_prob(x, nz)

    def forward(self, x, batch, log_library, cov=None, nz=None, generator=None) -> LossOutput:
        """Return the per-cell loss terms (``forward`` so that DistributedDataParallel can wrap it)."""
        return self.loss(x, batch, log_library, cov=cov, nz=nz, generator=generator)

    def loss(self, x, batch, log_library, *, cov=None, nz=None, generator=None) -> LossOutput:
        """One-sample reparameterised ELBO terms for a minibatch.

        ``nz`` = (rows, columns, values) of the non-zeros of ``x``, when the data layer has
        them from the sparse matrix (saves a search over the dense block).
        """
        mean, log_var = self.inference(x, batch, cov)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = reparameterize(mean, log_var, eps)
        rec = self.fused_log_px_z(x, z, batch, log_library, cov, nz)
        if rec is None:
            rec = self.log_px_z(x, self.generative(z, batch, log_library, cov), nz)
        return LossOutput(reconstruction=rec, kl=self.kl(mean, log_var, batch))

    def gene_dispersion(self, batch: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return theta per gene (1, genes) or per batch and gene (batches, genes), and each cell's row of it.

        A row of None means row 0. ``(None, None)`` for Poisson; not for a per-cell dispersion
        (``dispersion="gene-cell"``).
        """
        if self.likelihood == "poisson":
            return None, None
        theta = torch.exp(self.log_theta)
        return theta, batch if theta.shape[0] > 1 else None

    def fused_log_px_z(self, x, z, batch, log_library, cov=None, nz=None) -> torch.Tensor | None:
        """Log p(x | z) by the fused kernel (:mod:`~sc_vi_ext.module.fast_counts`); None where it does not apply.

        The same value and gradient as ``log_px_z(x, generative(z, ...))``, for one latent sample on
        CPU; it stands aside where the compiled likelihood is switched on (``tl.vae(compile=True)``).
        """
        if z.dim() != 2 or fused.compiled_enabled() or not fast_counts.applies(x, z, self.likelihood, self.dispersion):
            return None
        logits, zi, _ = self.decoder.heads(self.representation(z), self.covariates(batch, cov))
        if self.library == "latent":
            log_library = z[:, -1]
        theta, index = self.gene_dispersion(batch)
        return fast_counts.log_px_from_logits(self.likelihood, x, logits, zi if self.likelihood == "zinb" else None,
                                              log_library, theta, index, nz)


HPARAMS = tuple(inspect.signature(VAE).parameters)  # n_genes, n_batch, n_cov, then the settings
# the one home of the settings' defaults (``tl.vae`` and the model store read them here)
DEFAULTS = {name: p.default for name, p in inspect.signature(VAE).parameters.items() if p.default is not p.empty}
