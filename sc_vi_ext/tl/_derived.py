"""What the tools derive from a stored model, so that a new model under the same key replaces it all.

Which results belong to which key is in :mod:`._shared`; a result of another key is never removed
with the results of the key being replaced.
"""

from __future__ import annotations

from anndata import AnnData
from scanpy import logging as logg

from ._shared import derived_results, model_keys


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
