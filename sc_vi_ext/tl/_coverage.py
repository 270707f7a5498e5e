"""``tl.reference_coverage``: which query cells the reference model does not explain."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._progress import tqdm
from ..diagnostics import coverage as cov
from ..inputs import batch_codes_as
from ..model_store import held_out_mask, stored_loader
from ..threads import cpu_threads
from ._utils import stored_model

MIN_CALIBRATION_CELLS = 10
FEW_CALIBRATION_CELLS = 100  # below this, the coverage's tail is coarse: said in the log


def _checked_inputs(adata: AnnData, reference: AnnData, key: str, groupby: str | None):
    """Every check before anything is computed or written; returns the reference's held-out mask."""
    for name, ad in (("adata", adata), ("reference", reference)):
        if f"X_{key}" not in ad.obsm:
            what = "sv.tl.vae_map(adata, reference=reference" if name == "adata" else "sv.tl.vae(reference"
            raise KeyError(f"{name}.obsm['X_{key}'] not found; run {what}, key_added={key!r}) first.")
    genes = [np.asarray(ad.uns[key].get("var_names", [])).astype(str) for ad in (adata, reference)]
    if not np.array_equal(*genes):
        raise ValueError(f"The model under {key!r} in adata is not the reference's (other genes): map the query "
                         f"with sv.tl.vae_map(adata, reference=reference, key={key!r}) first.")
    val = held_out_mask(reference, key)
    if val.sum() < MIN_CALIBRATION_CELLS:
        raise ValueError(f"The reference holds {int(val.sum())} held-out cells under {key!r}, at least "
                         f"{MIN_CALIBRATION_CELLS} are needed to calibrate the coverage; train the reference with "
                         "sv.tl.vae(reference, train_size=0.9) (or lower) so that some cells are held out.")
    if groupby is not None and groupby not in adata.obs:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs.")
    return val


def _self_rows(adata: AnnData, reference: AnnData, key: str, train: np.ndarray) -> np.ndarray:
    """Query cells that are reference training cells themselves (same name and latent position)."""
    pos = pd.Index(reference.obs_names[train]).get_indexer(adata.obs_names)
    same = pos >= 0
    if same.any():
        ref_lat = reference.obsm[f"X_{key}"][np.flatnonzero(train)[pos[same]]]
        same[same] = np.all(np.isclose(np.asarray(adata.obsm[f"X_{key}"])[same], ref_lat), axis=1)
    return same


def _summaries(coverage, flag, groups, genes, top_genes, top_scores, n_report):
    """Per group: cells, median coverage, share uncovered and the genes driving its uncovered cells."""
    out = {}
    for g in pd.unique(groups):
        m = np.asarray(groups == g)
        rec = {"n_cells": int(m.sum()), "coverage_median": float(np.median(coverage[m])),
               "frac_uncovered": float(flag[m].mean()), "n_uncovered": int(flag[m].sum())}
        u = m & flag
        if u.any():
            score = np.zeros(len(genes))
            np.add.at(score, top_genes[u].ravel(), np.maximum(top_scores[u], 0).ravel())
            best = np.argsort(-score)[:n_report]
            rec["top_genes"] = [str(genes[i]) for i in best if score[i] > 0]
        out[str(g)] = rec
    return out


@doc_params()
@cpu_threads
def reference_coverage(
    adata: AnnData,
    *,
    reference: AnnData,
    key: str = "vae",
    alpha: float = 0.05,
    groupby: str | None = None,
    n_top_genes: int = 10,
    n_neighbors: int = 15,
    n_scale_cells: int = 1000,
    max_steps: int = 20,
    batch_size: int = 256,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Score how well the reference model explains each cell; flag the cells it does not cover.

    Run after :func:`vae_map` (or on the reference itself). Four pieces of evidence per cell,
    each from the reference's generative model at the cell's own best latent point z* (the
    maximum of log p(x | z) + log p(z) from the encoder's mean, decoder frozen):

    ``model_miss``
        Deviance per count at z*: the decoder cannot reproduce the cell as a whole.
    ``programme``
        Mean of the ``n_top_genes`` largest per-gene robust z-scores of the signed deviance
        residuals, each gene against reference training cells: a few genes far above what
        the decoder produces, the mark of an expression programme the reference lacks.
    ``latent_novelty``
        Mean latent distance to the ``n_neighbors`` nearest reference training cells.
    ``encoder_miss``
        log p(x, z*) - log p(x, mu): what refinement gains over the encoder (an encoder miss).

    Each is compared with the reference's held-out cells of similar depth and turned into an
    upper-tail p-value; Fisher's combination of the four is calibrated on the same held-out
    cells, so ``coverage`` is close to uniform on typical reference cells and
    ``coverage < alpha`` flags about ``alpha`` of them. For a batch the reference never saw,
    the leftover batch effect of the mapping is not counted as novelty: each gene's residual
    location is taken from the batch's own cells, and each component loses the batch-wide
    offset and widening of its lower quantiles (this assumes that most of a new batch is
    covered). See the documentation page "Reference coverage" for what each part signals.

    Parameters
    ----------
    {adata}
        The query, mapped with :func:`vae_map` onto ``reference`` (or ``reference`` itself).
    reference
        The AnnData holding the trained reference model in ``uns[key]``, its latent space in
        ``obsm["X_" + key]`` and its held-out cells (``tl.vae(train_size < 1)``).
    {key}
    alpha
        Flag threshold on the coverage: about this share of typical reference cells is flagged
        (0.05 at most keeps the false flags at 5%; lower it for fewer false flags and fewer
        novel cells caught).
    groupby
        Column of ``adata.obs`` for the group summaries and their driving genes; None: the
        reference's ``batch_key`` when it has one, else all cells together.
    n_top_genes
        Genes per cell in the programme score and listed as its drivers.
    n_neighbors
        Reference training cells in the latent distance.
    n_scale_cells
        Reference training cells (random) that set each gene's residual location and scale.
    max_steps
        Cap on L-BFGS evaluations per cell for z*.
    {apply_model}

    Returns
    -------
    None, or a copy with ``copy=True``; writes

    ``adata.obs[key + "_coverage"]``
        In (0, 1]; low: the reference does not explain the cell. The share of the reference's
        held-out cells whose combined evidence is at least this cell's (beyond their top 10%,
        an exponential tail fitted to them).
    ``adata.obs[key + "_uncovered"]``
        Boolean flag, ``coverage < alpha``.
    ``adata.obs[key + "_" + name]`` and ``[key + "_" + name + "_p"]``
        Each component (``model_miss``, ``programme``, ``latent_novelty``, ``encoder_miss``)
        and its p-value against depth-matched reference held-out cells.
    ``adata.obs[key + "_coverage_genes"]``
        For uncovered cells, their ``n_top_genes`` driving genes, comma-separated ("" otherwise).
    ``adata.obs[key + "_trust"]``, ``[key + "_untrusted"]``
        Only where :func:`trust_score` was run: trust becomes min(encoder trust, coverage) and an
        uncovered cell is untrusted (the encoder-only values stay in ``[key + "_trust_encoder"]``).
    ``adata.uns[key]["coverage"]``
        ``params``, ``threshold`` (alpha), ``calibration`` (what the coverage was calibrated
        on: ``n_cells`` held-out reference cells, ``frac_flagged`` of them, ``n_scale_cells``),
        ``frac_uncovered``, ``groupby`` and ``groups``: per group ``n_cells``,
        ``coverage_median``, ``frac_uncovered``, ``n_uncovered`` and ``top_genes`` (the genes
        that drive its uncovered cells most), and ``top_genes``: a DataFrame of the uncovered
        cells' driving genes, a row per cell, largest first.
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "reference", "copy")}
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha!r}.")
    q_module, dev = stored_model(adata, key, device)
    r_module, _ = stored_model(reference, key, device)
    val = _checked_inputs(adata, reference, key, groupby)
    train = ~val
    rng = np.random.default_rng(random_state)
    scale_idx = np.sort(rng.choice(np.flatnonzero(train), min(n_scale_cells, int(train.sum())), replace=False))
    loaders = [stored_loader(reference, key, scale_idx, batch_size=batch_size, device=dev),
               stored_loader(reference, key, np.flatnonzero(val), batch_size=batch_size, device=dev),
               stored_loader(adata, key, batch_size=batch_size, device=dev)]  # genes and batches checked here
    self_rows = _self_rows(adata, reference, key, train)
    n_ref_batches = len(reference.uns[key]["batch_categories"])
    batch_key = reference.uns[key]["params"].get("batch_key")
    groupby = groupby or (batch_key if batch_key in adata.obs else None)
    groups = np.asarray(adata.obs[groupby].astype(str)) if groupby else np.full(adata.n_obs, "all")
    adata = adata.copy() if copy else adata
    start = logg.info(f"scoring the reference coverage of {adata.n_obs} cells under {key!r}")
    if val.sum() < FEW_CALIBRATION_CELLS:
        logg.warning(f"only {int(val.sum())} held-out reference cells to calibrate on: coverage values below "
                     f"about 1/{int(val.sum())} rest on a fitted tail")
    bar = tqdm(total=sum(len(lo) for lo in loaders), desc="reference coverage", unit="batch", disable=not progress)
    scale_ev = cov.refine_cells(r_module, loaders[0], reference.n_obs, max_steps=max_steps, progress=bar)
    ref_center, spread = cov.gene_statistics(cov.residual_rows(r_module, loaders[0], scale_ev["z"]))
    cal = cov.refine_cells(r_module, loaders[1], reference.n_obs, max_steps=max_steps, progress=bar)
    cal["programme"], _, _ = cov.programme_scores(r_module, loaders[1], cal["z"], ref_center[None], spread,
                                                  n_top=n_top_genes)
    ev = cov.refine_cells(q_module, loaders[2], adata.n_obs, max_steps=max_steps, progress=bar)
    center, new_batch = _batch_centers(adata, key, q_module, ev["z"], ref_center, n_ref_batches, n_scale_cells,
                                       rng, dev)
    ev["programme"], top_genes, top_scores = cov.programme_scores(q_module, loaders[2], ev["z"], center, spread,
                                                                  n_top=n_top_genes)
    ref_lat = np.asarray(reference.obsm[f"X_{key}"])
    cal["latent_novelty"] = cov.latent_distance(ref_lat[train], ref_lat[val], n_neighbors=n_neighbors)
    ev["latent_novelty"] = cov.latent_distance(ref_lat[train], np.asarray(adata.obsm[f"X_{key}"]),
                                               n_neighbors=n_neighbors, skip_self=self_rows)
    stats = {c: ev[c] for c in cov.COMPONENTS}
    coverage, pvals, cal_cov = cov.combine({c: cal[c] for c in cov.COMPONENTS}, stats,
                                           cal["log_library"], ev["log_library"], shift_groups=new_batch)
    flag = coverage < alpha
    genes = np.asarray(reference.uns[key]["var_names"]).astype(str)
    adata.obs[f"{key}_coverage"] = coverage
    adata.obs[f"{key}_uncovered"] = flag
    for c in cov.COMPONENTS:
        adata.obs[f"{key}_{c}"] = stats[c]
        adata.obs[f"{key}_{c}_p"] = pvals[c]
    adata.obs[f"{key}_coverage_genes"] = np.where(flag, [",".join(genes[i]) for i in top_genes], "")
    top = pd.DataFrame(genes[top_genes[flag]], index=adata.obs_names[flag],
                       columns=[f"gene_{i + 1}" for i in range(top_genes.shape[1])])
    adata.uns[key]["coverage"] = {
        "params": params, "threshold": float(alpha), "groupby": groupby or "",
        "calibration": {"n_cells": int(val.sum()), "cells": "held-out cells of the reference",
                        "frac_flagged": float((cal_cov < alpha).mean()), "n_scale_cells": len(scale_idx)},
        "frac_uncovered": float(flag.mean()),
        "groups": _summaries(coverage, flag, groups, genes, top_genes, top_scores, n_top_genes),
        "top_genes": top,
    }
    merged = merge_into_trust(adata, key)
    text = f"{100 * flag.mean():.1f}% of cells uncovered (coverage < {alpha:g})"
    bar.set_postfix_str(text, refresh=True)
    bar.close()
    logg.info(f"    {text}; {100 * (cal_cov < alpha).mean():.1f}% of {int(val.sum())} held-out reference cells")
    logg.info("    finished", time=start, deep=f"added\n    '{key}_coverage', '{key}_uncovered', the components "
              f"and their p-values (adata.obs)\n    'coverage' (adata.uns['{key}'])"
              + (f"\n    updated '{key}_trust', '{key}_untrusted' with the coverage" if merged else ""))
    return adata if copy else None


def _batch_centers(adata, key, module, z, ref_center, n_ref_batches, n_cells, rng, dev):
    """Per-gene residual location per batch code: the reference's, re-estimated for batches it never saw.

    A new batch's centre is the median residual of up to ``n_cells`` of its own cells: a gene the
    mapping fits worse across the whole batch is a batch effect, not a new programme (the median
    stays put while a novel population is under half of the batch). Returns the centres (batch codes,
    genes) and, per cell, its batch code where the reference never saw the batch, else -1 (None: no new batch).
    """
    p = adata.uns[key]["params"]
    codes, _ = batch_codes_as(adata, p["batch_key"], list(adata.uns[key]["batch_categories"]))
    if codes is None or codes.max() < n_ref_batches:
        return ref_center[None], None
    center = np.tile(ref_center, (int(codes.max()) + 1, 1))
    for b in range(n_ref_batches, int(codes.max()) + 1):
        pool = np.flatnonzero(codes == b)
        if len(pool):
            idx = np.sort(rng.choice(pool, min(n_cells, len(pool)), replace=False))
            rows = cov.residual_rows(module, stored_loader(adata, key, idx, device=dev), z)
            center[b] = np.median(rows, axis=0)
    return center, np.where(codes >= n_ref_batches, codes, -1)


def merge_into_trust(adata: AnnData, key: str) -> bool:
    """Where both the trust score and the coverage are in ``obs``, make trust respect the coverage.

    The encoder-only trust is kept in ``obs[key + "_trust_encoder"]`` (and ``_untrusted_encoder``).
    """
    cols = adata.obs.columns
    if not {f"{key}_trust", f"{key}_coverage"} <= set(cols):
        return False
    for name in ("trust", "untrusted"):
        if f"{key}_{name}_encoder" not in cols:
            adata.obs[f"{key}_{name}_encoder"] = adata.obs[f"{key}_{name}"].to_numpy()
    enc_trust = adata.obs[f"{key}_trust_encoder"].to_numpy()
    adata.obs[f"{key}_trust"] = np.minimum(enc_trust, adata.obs[f"{key}_coverage"].to_numpy())
    adata.obs[f"{key}_untrusted"] = (adata.obs[f"{key}_untrusted_encoder"].to_numpy().astype(bool)
                                     | adata.obs[f"{key}_uncovered"].to_numpy().astype(bool))
    return True
