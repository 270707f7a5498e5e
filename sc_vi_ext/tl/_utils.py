"""Plumbing shared by the tools that apply a stored model."""

from __future__ import annotations

from anndata import AnnData
from torch import nn

from ..model_store import get_model
from ._vae import resolve_device


def stored_model(adata: AnnData, key: str, device: str) -> tuple[nn.Module, str]:
    """Rebuild the model stored under ``key`` on ``device`` ("auto": CUDA when available).

    Returns the module and the name of the device it is on (for minibatches and generators).
    """
    module = get_model(adata, key, device=resolve_device(device))
    return module, str(next(module.parameters()).device)
