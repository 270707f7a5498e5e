"""Encoder and decoder networks of the scVI model (Lopez et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VAR_FLOOR = 1e-4  # q(z | x)'s variance floor, as in scvi-tools


class FCLayers(nn.Module):
    """``n_layers`` blocks of Linear -> BatchNorm -> ReLU -> Dropout.

    A one-hot covariate (``n_cat`` columns) is concatenated to the input of every block,
    as scvi-tools does with ``deeply_inject_covariates``.
    """

    def __init__(self, n_in: int, n_out: int, *, n_cat: int, n_layers: int, dropout: float):
        super().__init__()
        self.n_cat = n_cat
        dims = [n_in] + [n_out] * n_layers
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    nn.Linear(d_in + n_cat, d_out),
                    # scvi-tools' BatchNorm settings, kept for like-for-like comparison
                    nn.BatchNorm1d(d_out, momentum=0.01, eps=1e-3),
                    nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
                ]
            )
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # BatchNorm1d wants (N, C): fold any sample axis
        if cat is not None:
            cat = cat.expand(*lead, cat.shape[-1]).reshape(-1, cat.shape[-1])
        for linear, bn, drop in self.layers:
            h = torch.cat([x, cat], dim=-1) if cat is not None else x
            # .float(): under bfloat16 autocast only the Linear runs in bfloat16; BatchNorm and after in float32
            x = drop(F.relu(bn(linear(h).float())))
        return x.reshape(*lead, -1)


class Encoder(nn.Module):
    """Amortized posterior q(z | x): log1p(counts) (+ covariates) -> Gaussian mean, log-variance."""

    def __init__(self, n_genes, n_latent, *, n_cat, n_hidden, n_layers, dropout):
        super().__init__()
        self.net = FCLayers(n_genes, n_hidden, n_cat=n_cat, n_layers=n_layers, dropout=dropout)
        self.mean = nn.Linear(n_hidden, n_latent)
        self.log_var = nn.Linear(n_hidden, n_latent)

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(torch.log1p(x), cat)
        # the variance floor, written in log space; .float(): under bfloat16
        # autocast the Linear layers compute in bfloat16, everything after them in float32
        log_var = torch.log(torch.exp(self.log_var(h).float()) + VAR_FLOOR)
        return self.mean(h).float(), log_var


class Decoder(nn.Module):
    """p(x | z): z (+ covariates) -> gene proportions (softmax), zero-inflation logits, dispersion."""

    def __init__(self, n_latent, n_genes, *, n_cat, n_hidden, n_layers, zero_inflated, cell_dispersion=False):
        super().__init__()
        self.net = FCLayers(n_latent, n_hidden, n_cat=n_cat, n_layers=n_layers, dropout=0.0)
        self.scale = nn.Linear(n_hidden, n_genes)
        self.zi_logits = nn.Linear(n_hidden, n_genes) if zero_inflated else None
        self.log_theta = nn.Linear(n_hidden, n_genes) if cell_dispersion else None  # "gene-cell"

    def forward(self, z: torch.Tensor, cat: torch.Tensor | None):
        """Log gene proportions, zero-inflation logits (or None), per-cell log dispersion (or None)."""
        logits, zi, log_theta = self.heads(z, cat)
        return F.log_softmax(logits, dim=-1), zi, log_theta

    def heads(self, z: torch.Tensor, cat: torch.Tensor | None):
        """Gene logits (before the softmax), zero-inflation logits (or None), per-cell log dispersion (or None)."""
        h = self.net(z, cat)
        # float32 also under bfloat16 autocast
        zi = self.zi_logits(h).float() if self.zi_logits is not None else None
        log_theta = self.log_theta(h).float() if self.log_theta is not None else None
        return self.scale(h).float(), zi, log_theta
