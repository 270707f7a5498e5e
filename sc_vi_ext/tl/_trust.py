"""``tl.trust_score``: per cell, how far to trust the encoder's latent position."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._progress import tqdm
from ..diagnostics import optimize_q
from ..diagnostics.trust import compare_to_reference
from ..model_store import held_out_mask, stored_loader
from ..threads import cpu_threads
from ._coverage_parts import merge_into_trust
from ._shared import TRUST_COLUMNS
from ._utils import stored_model


@doc_params()
@cpu_threads
def trust_score(
    adata: AnnData,
    *,
    key: str = "vae",
    max_steps: int = 10,
    n_neighbors: int = 100,
    n_mads: float = 3.0,
    batch_size: int = 256,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Score every cell by how well the encoder serves it, against training cells of similar depth.

    This measures encoder quality only: a cell of a type the model never saw can be encoded
    as well as any other and still be explained badly by the model. Whether the model covers
    a cell at all is :func:`reference_coverage`; when its result is in ``obs`` (run before or
    after this tool), trust is capped by the coverage and an uncovered cell is untrusted, so
    ``trust`` never calls an uncovered cell trustworthy.

    For each cell, a short per-cell optimisation of q from the encoder's output (the
    L-BFGS optimiser of :func:`amortization_gap`, capped at ``max_steps`` decoder passes,
    on the cell's own fixed draws) estimates its amortization gap: the ELBO the shared
    encoder leaves on the table. That estimate is compared with the ``n_neighbors`` training
    cells nearest in log library size, since gaps in nats grow with the counts at stake:
    the encoder was fitted to those cells, so they show what a well-served cell of that
    depth looks like. Cheap enough for a whole data set (about a tenth of
    :func:`amortization_gap` per cell, no importance sampling).

    How to read it: ``trust`` near 0.5 is a typical training cell. A cell with trust 0.01
    has a larger gap than 99% of comparable training cells: its position in ``obsm`` is
    not where the model itself would put it, so its neighbours, UMAP position and cluster
    are less reliable. For flagged cells (``untrusted``), run :func:`refine` and use
    ``obsm["X_" + key + "_refined"]``, or leave them out of conclusions that hinge on
    their exact position. Many flagged held-out cells and few flagged training cells mean
    the encoder overfits its training cells (compare ``uns[key]["trust"]`` per split).

    Parameters
    ----------
    {adata}
    {key}
    max_steps
        Decoder passes (with gradient) per cell; the gap estimate is a lower bound that
        tightens with more (the full optimisation usually stops after 5-10).
    n_neighbors
        Training cells, nearest in log library size, that each cell is compared with.
    n_mads
        A cell is flagged when its gap exceeds the comparable training cells' median by
        more than this many robust standard deviations (1.4826 x median absolute deviation).
    {apply_model}

    Returns
    -------
    None, or a copy with ``copy=True``; writes

    ``adata.obs[key + "_gap_estimate"]``
        Estimated amortization gap per cell, nats (ELBO gained on the cell's own draws).
    ``adata.obs[key + "_trust"]``
        Fraction of comparable training cells whose gap is at least this cell's, in (0, 1]:
        high is trustworthy, near 0 is worse than nearly every comparable training cell.
        With ``obs[key + "_coverage"]`` present: the smaller of that and the coverage.
    ``adata.obs[key + "_untrusted"]``
        Boolean flag: gap above the comparable training cells' median by more than ``n_mads``
        robust standard deviations; with the coverage present, also every uncovered cell.
    ``adata.obs[key + "_trust_encoder"]``, ``[key + "_untrusted_encoder"]``
        Only with the coverage present: the encoder-only trust and flag.
    ``adata.uns[key]["trust"]``
        ``params``, ``uses_coverage`` (whether trust was capped by the coverage), and for
        ``"train"``, ``"validation"`` and ``"all"`` cells: ``n_cells``,
        ``gap_estimate_median``, ``trust_median`` and ``frac_untrusted`` (encoder only).
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "copy")}
    module, dev = stored_model(adata, key, device)
    adata = adata.copy() if copy else adata
    start = logg.info(f"scoring the inference of {key!r} on {adata.n_obs} cells")
    val = held_out_mask(adata, key)  # checked before the per-cell work, like every other input
    gen = torch.Generator(device=dev).manual_seed(random_state)
    gaps, log_lib = [], []
    loader = stored_loader(adata, key, batch_size=batch_size, device=dev)
    bar = tqdm(total=len(loader), desc="trust score", unit="batch", disable=not progress)
    for mb in loader:
        qs = optimize_q(module, mb.x, mb.batch, mb.log_library, cov=mb.cov, max_steps=max_steps, generator=gen)
        gaps.append(qs.saa_gain.cpu().numpy().astype(np.float64))
        log_lib.append(mb.log_library.cpu().numpy().astype(np.float64))
        bar.update()
    gap, log_lib = np.concatenate(gaps), np.concatenate(log_lib)
    trust, z = compare_to_reference(gap, log_lib, ~val, n_neighbors=n_neighbors)
    flag = z > n_mads
    for name, values in zip(TRUST_COLUMNS, (gap, trust, flag), strict=True):
        adata.obs[f"{key}_{name}"] = values
    # stale encoder-only columns of an earlier run
    for stale in (f"{key}_trust_encoder", f"{key}_untrusted_encoder"):
        if stale in adata.obs:
            del adata.obs[stale]
    summary = {"params": params}
    for split, m in (("train", ~val), ("validation", val), ("all", np.ones_like(val))):
        if m.any():
            summary[split] = {"n_cells": int(m.sum()), "gap_estimate_median": float(np.median(gap[m])),
                              "trust_median": float(np.median(trust[m])), "frac_untrusted": float(flag[m].mean())}
    summary["uses_coverage"] = merge_into_trust(adata, key)
    adata.uns[key]["trust"] = summary
    text = ", ".join(f"{lab} {100 * summary[s]['frac_untrusted']:.1f}% (median trust {summary[s]['trust_median']:.2f})"
                     for s, lab in (("train", "training"), ("validation", "held-out")) if s in summary)
    bar.set_postfix_str(f"flagged: {text}", refresh=True)
    bar.close()
    logg.info(f"    flagged as untrusted: {text}")
    if summary["uses_coverage"]:
        logg.info(f"    trust capped by '{key}_coverage'; the encoder-only values are in '{key}_trust_encoder'")
    else:
        logg.info("    trust measures the encoder only; sv.tl.reference_coverage tells if the model covers a cell")
    logg.info("    finished", time=start, deep=f"added\n    '{key}_gap_estimate', '{key}_trust', '{key}_untrusted' "
              f"(adata.obs)\n    'trust' (adata.uns['{key}'])")
    return adata if copy else None
