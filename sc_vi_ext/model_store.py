"""Keep a trained model inside the AnnData: weights as plain arrays in ``uns``, no pickle.

A model is rebuilt from ``adata.uns[key]`` alone, also after ``write_h5ad``/``read_h5ad``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from anndata import AnnData

from .dataloader import Minibatches
from .inputs import (
    batch_codes_as,
    counts_label,
    covariate_design,
    get_counts,
    inspect_counts,
    log_library,
    raw_hint,
    require_unique,
)
from .module.vae import HPARAMS, VAE


def stored_names(values) -> np.ndarray:
    """Names kept in ``uns`` (genes, held-out cells, categories) as an object array of ``str``.

    Whatever the file format gave back: h5ad returns object arrays, zarr numpy ``StringDType``
    arrays (which ``astype(str)`` cannot cast), an empty list may come back as a float array.
    """
    return np.array([str(v) for v in np.asarray(values, dtype=object).ravel()], dtype=object)


def stored_categories(categories: Mapping | None) -> dict | None:
    """Return the stored categories of each categorical covariate as lists of ``str`` (None when there are none)."""
    return {k: list(stored_names(v)) for k, v in categories.items()} if categories else None


def state_to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def _stored(adata: AnnData, key: str) -> dict:
    uns = adata.uns.get(key)
    if not isinstance(uns, Mapping) or "model" not in uns:
        raise KeyError(f"No trained model under adata.uns[{key!r}]; run sv.tl.vae(adata, key_added={key!r}) first.")
    return uns


def _damaged(key: str, detail: str) -> ValueError:
    return ValueError(
        f"The model stored in adata.uns[{key!r}]['model'] is damaged or incomplete ({detail}); "
        f"retrain it with sv.tl.vae(adata, key_added={key!r})."
    )


def _build(uns: Mapping, key: str) -> VAE:
    """Build the VAE of ``uns`` and load its weights, after checking every stored array.

    The VAE's arguments are the tool's settings of the same names in ``uns["params"]`` (settings
    that older versions did not store take the VAE's defaults) and the number of batch categories.
    """
    p = uns["params"]
    hparams = {k: p[k] for k in HPARAMS if k in p}
    hparams.update(n_genes=p["n_genes"], n_cov=p.get("n_cov", 0), n_batch=len(uns["batch_categories"]))
    stored = uns["model"]
    if not isinstance(stored, Mapping):
        raise _damaged(key, f"a {type(stored).__name__} instead of a mapping of weight arrays")
    _check_sizes(hparams, stored, key)
    with torch.device("meta"):  # the architecture's shapes, without allocating or initialising anything
        expected = VAE(**hparams).state_dict()
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise _damaged(key, f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = {}
    for name, value in stored.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiub":
            raise _damaged(key, f"{name!r} holds {arr.dtype} values, not numbers")
        if arr.shape != tuple(expected[name].shape):
            raise _damaged(key, f"{name!r} has shape {arr.shape}, the architecture needs {tuple(expected[name].shape)}")
        if not np.all(np.isfinite(arr)):
            raise _damaged(key, f"{name!r} has NaN or infinite values")
        state[name] = torch.as_tensor(arr).to(expected[name].dtype)
    names = uns.get("var_names")
    if names is not None and len(names) != hparams["n_genes"]:
        raise _damaged(key, f"{len(names)} gene names for {hparams['n_genes']} genes")
    module = VAE(**hparams)  # the settings agree with the stored weights: as large as they are
    module.load_state_dict(state)
    return module


_SIZES = {"n_genes": 1, "n_hidden": 1, "n_latent": 1, "n_layers": 1, "n_cov": 0}  # each setting's smallest value


def _check_sizes(hparams: dict, stored: Mapping, key: str) -> None:
    """Refuse size settings that are not integers, or more layers than there are stored arrays.

    Runs before anything is built, so that a file whose settings were altered (``n_layers``
    of 10^4) fails at once instead of building a huge model first; the other sizes are then
    compared with the stored shapes on a model that allocates nothing.
    """
    for name, low in _SIZES.items():
        value = hparams.get(name, low)
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < low:
            raise _damaged(key, f"params[{name!r}] is {value!r}, not an integer >= {low}")
        hparams[name] = int(value)
    if hparams.get("n_layers", 1) > len(stored):  # every layer stores several arrays
        raise _damaged(key, f"params['n_layers'] is {hparams['n_layers']} but only {len(stored)} weight arrays "
                            "are stored")


def get_model(adata: AnnData, key: str = "vae", *, device: str = "cpu") -> VAE:
    """Rebuild the trained VAE stored in ``adata.uns[key]``, in eval mode.

    Every stored array is checked (names, shapes, numeric and finite values) first.

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
    try:
        module = _build(uns, key)
    except ValueError as e:
        if str(e).startswith("The model stored in"):
            raise
        raise _damaged(key, str(e)) from e
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise _damaged(key, f"{type(e).__name__}: {e}") from e
    return module.to(device).eval()


def gene_alignment(adata: AnnData, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Match the genes of the model under ``key`` to ``adata``: their names and columns in ``adata``.

    The model's genes are matched to ``adata.var_names`` by name (genes in another order
    are reordered; genes the model lacks are ignored). The column array is None when
    ``adata`` has exactly the model's genes in its order; -1 marks a gene absent from a
    query mapped with :func:`sc_vi_ext.tl.vae_map` (zero counts, as at mapping time).
    Raises a ValueError naming missing genes.
    """
    uns = _stored(adata, key)
    n_genes = int(uns["params"]["n_genes"])
    names = uns.get("var_names")
    if names is None:  # stored by an older version, without gene names: match by position
        gene_index = uns.get("gene_index")
        n_cols = adata.n_vars if gene_index is None else len(gene_index)
        if n_cols != n_genes:
            raise ValueError(f"The model under {key!r} was trained on {n_genes} genes, the data has {adata.n_vars}.")
        warnings.warn(
            f"The model under {key!r} stores no gene names (trained with an older sc_vi_ext): genes are matched "
            "by position only. Retrain it to bind the model to its genes.", UserWarning, stacklevel=3,
        )
        if gene_index is None:
            return np.asarray(adata.var_names, dtype=object), None
        gene_index = np.asarray(gene_index)
        names = np.asarray(adata.var_names, dtype=object)[np.maximum(gene_index, 0)]
        return np.where(gene_index >= 0, names, ""), gene_index
    names = stored_names(names)
    if adata.n_vars == len(names) and np.array_equal(names, stored_names(adata.var_names)):
        return names, None
    if not adata.var_names.is_unique:
        raise ValueError("adata.var_names are not unique, so genes cannot be matched to the model's by name; "
                         "run adata.var_names_make_unique() first.")
    gene_index = adata.var_names.get_indexer(names)
    required = np.ones(len(names), bool) if "gene_index" not in uns else np.asarray(uns["gene_index"]) >= 0
    missing = names[(gene_index < 0) & required]
    if len(missing):
        raise ValueError(
            f"{len(missing)} of the {len(names)} genes of the model under {key!r} are not in adata.var_names "
            f"(e.g. {list(missing[:5])}). A model applies to the genes it was trained on; to place data with "
            f"other genes in its latent space, use sv.tl.vae_map(adata, reference=<the AnnData holding the model>)."
        )
    return names, gene_index


def held_out_mask(adata: AnnData, key: str) -> np.ndarray:
    """Which cells of ``adata`` were held out from training the model under ``key`` (by obs name)."""
    uns = _stored(adata, key)
    require_unique(adata, "obs")  # a duplicate name would count a cell as held out that was not
    if "validation_obs_names" in uns:
        return np.asarray(adata.obs_names.isin(list(stored_names(uns["validation_obs_names"]))))
    pos = np.asarray(uns.get("validation_indices", []), dtype=int)  # older versions stored positions
    if len(pos) and pos.max() >= adata.n_obs:
        raise ValueError(f"The model under {key!r} stores its held-out cells as positions (older sc_vi_ext), "
                         "which do not fit this AnnData (a subset?); retrain it to store them by name.")
    mask = np.zeros(adata.n_obs, bool)
    mask[pos] = True
    return mask


def stored_loader(adata: AnnData, key: str, indices=None, *, batch_size: int = 256, device: str = "cpu") -> Minibatches:
    """Minibatches of ``adata`` (in order) prepared as the model stored under ``key`` expects.

    The counts are checked as for training and aligned to the model's genes by name; only the
    rows of ``indices`` are read (each once for the check, once per pass), so tools on a
    subset of a large (backed) AnnData stay cheap.
    """
    p = _stored(adata, key)["params"]
    use_raw = bool(p.get("use_raw", False))  # not stored by older versions
    X = get_counts(adata, p["layer"], use_raw=use_raw)
    _, gene_index = gene_alignment(adata, key)
    codes, unknown = batch_codes_as(adata, p["batch_key"], list(stored_names(adata.uns[key]["batch_categories"])))
    if unknown:
        raise ValueError(f"Batches {sorted(unknown)} were not seen in training under {key!r}.")
    what = counts_label(p["layer"], use_raw=use_raw)
    indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
    counts = inspect_counts(X, what, gene_index, rows=None if len(indices) == adata.n_obs else indices,
                            hint=lambda: raw_hint(adata, p["layer"], use_raw=use_raw))
    log_lib = log_library(adata, counts.totals, p.get("size_factor_key"))
    cov, _ = covariate_design(adata, p.get("categorical_covariate_keys"), p.get("continuous_covariate_keys"),
                              stored_categories(adata.uns[key].get("covariate_categories")))
    return Minibatches(X, indices, log_library=log_lib, batch=codes, cov=cov, batch_size=batch_size,
                       device=device, gene_index=gene_index, **counts.read_options)
