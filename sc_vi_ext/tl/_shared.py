"""What several tools share, below all of them (this module imports no tool).

The names of the tools' results, which stored model a result belongs to, and the draws from
q(z | x). Every result belongs to one key: a model's own slots (``obsm["X_" + key]``,
``uns[key]``) and what the tools derived from it. Names of two keys can meet (the refined
latent of ``"vae"``, ``obsm["X_vae_refined"]``, is also the latent of a model stored under
``"vae_refined"``): a result of one key is then never overwritten by the results of the other.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from anndata import AnnData

from ..diagnostics import COLUMNS
from ..module.distributions import reparameterize

# the obs columns "<key>_<name>" that tl.amortization_gap and tl.trust_score write
GAP_COLUMNS = (*COLUMNS, "amortization_gap_se", "approximation_gap_se", "library_size")
TRUST_COLUMNS = ("gap_estimate", "trust", "untrusted")
STATS = ("mean", "var", "cv", "frac_zero")  # posterior_predictive's per-gene statistics
PPC_SUFFIXES = ("obs", "pred", "pred_sd")  # posterior_predictive: var columns "<key>_ppc_<stat>_<suffix>"


def sample_latent(mean: torch.Tensor, log_var: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` reparameterised draws from q(z | x): (n, cells, latent_dim)."""
    eps = torch.randn((n, *mean.shape), generator=gen, device=mean.device, dtype=mean.dtype)
    return reparameterize(mean, log_var, eps)


def derived_results(adata: AnnData, key: str) -> dict[str, list[str]]:
    """List the slots of ``adata`` that tools computed from the model under ``key``, by attribute."""
    obs_columns = (*GAP_COLUMNS, *TRUST_COLUMNS, "log_px_ess", "refine_gain")  # + log_likelihood, refine
    out = {
        "obs": [f"{key}_{c}" for c in dict.fromkeys(obs_columns) if f"{key}_{c}" in adata.obs],
        "obsm": [f"X_{key}_refined"] if f"X_{key}_refined" in adata.obsm else [],
        "layers": [],
        "var": [f"{key}_ppc_{s}_{x}" for s in STATS for x in PPC_SUFFIXES if f"{key}_ppc_{s}_{x}" in adata.var],
        "uns": [],
    }
    old = adata.uns.get(key)
    records = old.get("normalized_expression", {}) if isinstance(old, Mapping) else {}
    for name, rec in records.items():
        slot = rec.get("slot", "layers") if isinstance(rec, Mapping) else "layers"
        if slot in ("layers", "obsm") and name in getattr(adata, slot):
            out[slot].append(name)
    for name, value in adata.uns.items():  # differential_expression results name their model in params
        if name != key and isinstance(value, Mapping) and isinstance(value.get("params"), Mapping) \
                and value["params"].get("key") == key:
            out["uns"].append(name)
    return out


def model_keys(adata: AnnData) -> list[str]:
    """Return the keys of ``uns`` that hold a stored model."""
    return [k for k, v in adata.uns.items() if isinstance(v, Mapping) and "model" in v]


def owner(adata: AnnData, attr: str, name: str) -> str | None:
    """Return the key whose result ``adata.<attr>[name]`` is: a model's own slot, else the model it was derived from."""
    keys = model_keys(adata)
    for k in keys:
        if (attr, name) in (("obsm", f"X_{k}"), ("uns", k)):
            return k
    return next((k for k in keys if name in derived_results(adata, k).get(attr, [])), None)


def check_free(adata: AnnData, key: str, attr: str, name: str) -> None:
    """Refuse to write ``adata.<attr>[name]`` for ``key`` when that slot holds a result of another key."""
    other = owner(adata, attr, name) if name in getattr(adata, attr) else None
    if other is not None and other != key:
        own = (attr, name) in (("obsm", f"X_{other}"), ("uns", other))
        raise ValueError(
            f"adata.{attr}[{name!r}] holds {'the result of' if own else 'a result derived from'} the model "
            f"stored under {other!r}; writing the results of {key!r} there would overwrite it. Store one of the two "
            f"models under another key (train it with key_added=...), or delete adata.{attr}[{name!r}] first."
        )
