"""What the tools derive from a stored model, so that a new model under the same key replaces it all.

Every result belongs to one key: a model's own slots (``obsm["X_" + key]``, ``uns[key]``) and
what the tools derived from it. Names of two keys can meet (the refined latent of ``"vae"``,
``obsm["X_vae_refined"]``, is also the latent of a model stored under ``"vae_refined"``): a result
of one key is then never removed with, nor overwritten by, the results of the other.
"""

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


def remove_derived(adata: AnnData, key: str) -> None:
    """Delete the results derived from the model under ``key`` (it is being replaced) and log them.

    A slot that is another stored model's own result (its latent) is not this key's, and stays.
    """
    found = derived_results(adata, key)
    others = [k for k in model_keys(adata) if k != key]
    found["obsm"] = [n for n in found["obsm"] if n not in {f"X_{k}" for k in others}]
    found["uns"] = [n for n in found["uns"] if n not in others]
    if not any(found.values()):
        return
    for attr, names in found.items():
        store = getattr(adata, attr)
        for name in names:  # a column of obs/var or an entry of obsm/uns/...: both deleted in place
            del store[name]
    logg.warning(
        f"replacing the model under {key!r}: removed the results derived from the old one: "
        + "; ".join(f"adata.{attr}: {', '.join(map(repr, names))}" for attr, names in found.items() if names)
    )
