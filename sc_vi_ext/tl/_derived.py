"""What the tools derive from a stored model, so that a new model under the same key replaces it all."""

from __future__ import annotations

from collections.abc import Mapping

from anndata import AnnData
from scanpy import logging as logg

PPC_SUFFIXES = ("obs", "pred", "pred_sd")  # posterior_predictive: var columns "<key>_ppc_<stat>_<suffix>"


def derived_results(adata: AnnData, key: str) -> dict[str, list[str]]:
    """List the slots of ``adata`` that tools computed from the model under ``key``, by attribute."""
    # the tools import _vae, which imports this module
    from ._gap import OBS_COLUMNS as GAP_COLUMNS
    from ._ppc import STATS as PPC_STATS
    from ._trust import OBS_COLUMNS as TRUST_COLUMNS

    obs_columns = (*GAP_COLUMNS, *TRUST_COLUMNS, "log_px_ess", "refine_gain")  # + log_likelihood, refine

    out = {
        "obs": [f"{key}_{c}" for c in dict.fromkeys(obs_columns) if f"{key}_{c}" in adata.obs],
        "obsm": [f"X_{key}_refined"] if f"X_{key}_refined" in adata.obsm else [],
        "layers": [],
        "var": [f"{key}_ppc_{s}_{x}" for s in PPC_STATS for x in PPC_SUFFIXES if f"{key}_ppc_{s}_{x}" in adata.var],
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


def remove_derived(adata: AnnData, key: str) -> None:
    """Delete the results derived from the model under ``key`` (it is being replaced) and log them."""
    found = derived_results(adata, key)
    if not any(found.values()):
        return
    for attr, names in found.items():
        store = getattr(adata, attr)
        if attr in ("obs", "var"):
            store.drop(columns=names, inplace=True)
        else:
            for name in names:
                del store[name]
    logg.warning(
        f"replacing the model under {key!r}: removed the results derived from the old one: "
        + "; ".join(f"adata.{attr}: {', '.join(map(repr, names))}" for attr, names in found.items() if names)
    )
