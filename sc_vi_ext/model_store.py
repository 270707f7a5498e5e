"""Keep a trained model inside the AnnData: weights as plain arrays in ``uns``, no pickle.

A model is rebuilt from ``adata.uns[key]`` alone, also after ``write_h5ad``/``read_h5ad``.
"""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData

from .dataloader import Minibatches, batch_codes, covariate_design, get_counts, log_library
from .module import VAE

ARCH_PARAMS = (
    "n_latent", "n_hidden", "n_layers", "dropout", "likelihood", "dispersion", "encode_covariates",
    "library", "latent_distribution",
)
_ARCH_DEFAULTS = {"library": "observed", "latent_distribution": "normal"}


def state_to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def _stored(adata: AnnData, key: str) -> dict:
    if key not in adata.uns or "model" not in adata.uns[key]:
        raise KeyError(f"No trained model under adata.uns[{key!r}]; run sv.tl.vae(adata, key_added={key!r}) first.")
    return adata.uns[key]


def get_model(adata: AnnData, key: str = "vae", *, device: str = "cpu") -> VAE:
    """Rebuild the trained VAE stored in ``adata.uns[key]``, in eval mode.

    Parameters
    ----------
    adata
        AnnData on which :func:`sc_vi_ext.tl.vae` was run (possibly read back from h5ad).
    key
        The ``key_added`` used for training.
    device
        Torch device to place the model on.

    Returns
    -------
    The :class:`sc_vi_ext.module.VAE` with the trained weights.
    """
    uns = _stored(adata, key)
    p = uns["params"]
    module = VAE(int(p["n_genes"]), n_batch=len(uns["batch_categories"]), n_cov=int(p.get("n_cov", 0)),
                 **{k: p.get(k, _ARCH_DEFAULTS.get(k)) for k in ARCH_PARAMS})
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in uns["model"].items()}
    module.load_state_dict(state)
    return module.to(device).eval()


def stored_loader(adata: AnnData, key: str, indices=None, *, batch_size: int = 256, device: str = "cpu") -> Minibatches:
    """Minibatches of ``adata`` (in order) prepared as the model stored under ``key`` expects.

    Reads only the rows of ``indices`` (each once per pass): the library size of a cell is
    computed from its minibatch, so tools on a subset of a large (backed) AnnData stay cheap.
    """
    p = _stored(adata, key)["params"]
    X = get_counts(adata, p["layer"])
    gene_index = adata.uns[key].get("gene_index")  # set by tl.vae_map on a query AnnData
    n_cols = X.shape[1] if gene_index is None else len(gene_index)
    if n_cols != int(p["n_genes"]):
        raise ValueError(f"The model under {key!r} was trained on {p['n_genes']} genes, the data has {X.shape[1]}.")
    codes, cats = batch_codes(adata, p["batch_key"])
    if codes is not None:
        trained = list(adata.uns[key]["batch_categories"])
        lookup = {c: i for i, c in enumerate(trained)}
        unknown = sorted(set(cats) - set(lookup))
        if unknown:
            raise ValueError(f"Batches {unknown} were not seen in training under {key!r}.")
        codes = np.array([lookup[c] for c in cats], dtype=np.int64)[codes]
    # library sizes: from obs, or from each minibatch's own rows; only the rows of `indices` are read
    sfk = p.get("size_factor_key")
    log_lib = None if sfk is None else log_library(adata, None, sfk)
    cov, _ = covariate_design(adata, p.get("categorical_covariate_keys"), p.get("continuous_covariate_keys"),
                              adata.uns[key].get("covariate_categories") or None)
    indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
    return Minibatches(X, indices, log_library=log_lib, batch=codes, cov=cov,
                       batch_size=batch_size, device=device, gene_index=gene_index)
