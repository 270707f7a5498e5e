"""``tl.reference_coverage``'s parts: input checks, the evidence per cell, group summaries, trust."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from ..diagnostics import coverage as cov
from ..diagnostics import coverage_local as loc
from ..diagnostics import coverage_shift as shift
from ..diagnostics.coverage_groups import MIN_CELLS, MIN_GROUPS
from ..inputs import batch_codes_as
from ..model_store import held_out_mask, stored_loader

MIN_CALIBRATION_CELLS = 10
MIN_LOCAL_CALIBRATION = 500  # held-out cells the neighbourhood evidence needs to be calibrated (see docs/coverage.md)


def checked_inputs(adata: AnnData, reference: AnnData, key: str, groupby: str | None, labels_key: str | None):
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
    if labels_key is not None:
        if labels_key not in reference.obs:
            raise KeyError(f"labels_key {labels_key!r} is not a column of reference.obs.")
        if reference.obs[labels_key].isna().any():
            raise ValueError(f"reference.obs[{labels_key!r}] has missing labels; fill or drop them first.")
    return val


def self_rows(adata: AnnData, reference: AnnData, key: str) -> np.ndarray:
    """Per query cell, its position in ``reference`` where it is that reference cell (name and latent), else -1."""
    pos = pd.Index(reference.obs_names).get_indexer(adata.obs_names)
    same = pos >= 0
    if same.any():
        ref_lat = reference.obsm[f"X_{key}"][pos[same]]
        same[same] = np.all(np.isclose(np.asarray(adata.obsm[f"X_{key}"])[same], ref_lat), axis=1)
    return np.where(same, pos, -1)


def within(ref_rows: np.ndarray, rows: np.ndarray, n_ref: int) -> np.ndarray:
    """Per query cell, the position in ``rows`` (reference positions) of its own reference cell, else -1."""
    at = np.full(n_ref, -1)
    at[rows] = np.arange(len(rows))
    return np.where(ref_rows >= 0, at[ref_rows], -1)


def evidence(adata, reference, key, q_module, r_module, dev, *, val, labels_key, n_top_genes, n_neighbors,
             n_local, n_scale_cells, max_steps, batch_size, rng, bar):
    """Every component on the calibration (held-out) cells and on the query; see ``reference_coverage``.

    Returns (calibration components, query components, query extras): the extras hold the local
    excess and z* positions of the query and of the calibration cells, the per-gene variance, the
    programme's genes and z-scores, the new-batch groups and which query cells are reference cells.
    """
    train_idx, val_idx = np.flatnonzero(~val), np.flatnonzero(val)
    scale_idx = np.sort(rng.choice(train_idx, min(n_scale_cells, len(train_idx)), replace=False))
    loaders = [stored_loader(reference, key, scale_idx, batch_size=batch_size, device=dev),
               stored_loader(reference, key, val_idx, batch_size=batch_size, device=dev),
               stored_loader(adata, key, batch_size=batch_size, device=dev)]  # genes and batches checked here
    n_lat = r_module.n_latent
    sc_ev = cov.refine_cells(r_module, loaders[0], reference.n_obs, max_steps=max_steps, progress=bar)
    r_scale, _ = cov.residual_rows(r_module, loaders[0], sc_ev["z"])
    ref_center, spread = cov.gene_statistics(r_scale)
    cal = cov.refine_cells(r_module, loaders[1], reference.n_obs, max_steps=max_steps, progress=bar)
    r_cal, _ = cov.residual_rows(r_module, loaders[1], cal["z"])
    ev = cov.refine_cells(q_module, loaders[2], adata.n_obs, max_steps=max_steps, progress=bar)
    r_q, codes = cov.residual_rows(q_module, loaders[2], ev["z"])
    center, new_batch = batch_centers(adata, key, r_q, ref_center, len(reference.uns[key]["batch_categories"]),
                                      n_scale_cells, rng)
    cal["programme"], _, _ = cov.programme_scores(r_cal, None, ref_center[None], spread, n_top=n_top_genes)
    ev["programme"], top_genes, top_scores = cov.programme_scores(r_q, codes, center, spread, n_top=n_top_genes)

    ref_rows = self_rows(adata, reference, key)
    in_scale = within(ref_rows, scale_idx, reference.n_obs)  # query cells that are scale cells: leave themselves out
    pos_s, pos_c, pos_q = sc_ev["z"][scale_idx, :n_lat], cal["z"][val_idx, :n_lat], ev["z"][:, :n_lat]
    base_c = loc.baseline(pos_c, pos_s, n_local)
    base_q = loc.baseline(pos_q, pos_s, n_local, exclude=in_scale)
    ex_c, ex_q = loc.local_excess(r_cal, r_scale, base_c), loc.local_excess(r_q, r_scale, base_q)
    offset = np.median(ex_c, axis=0)  # cells the model was not trained on sit off its training cells' residuals
    ex_c -= offset
    ex_q -= offset
    if new_batch is not None:  # a batch-wide shift of the excess is left-over batch effect, not a new state
        for b in np.unique(new_batch[new_batch >= 0]):
            m = np.flatnonzero(new_batch == b)
            ex_q[m] -= np.median(ex_q[np.sort(rng.choice(m, min(n_scale_cells, len(m)), replace=False))], axis=0)
    cal_variance = ex_c.var(axis=0)
    s2, t2 = loc.noise_variances(r_scale, pos_s, cal_variance, base_c, n_local)
    cal["neighbourhood"] = loc.neighbourhood_statistic(ex_c, loc.neighbourhoods(pos_c, n_local), base_c, s2, t2)
    ev["neighbourhood"] = loc.neighbourhood_statistic(ex_q, loc.neighbourhoods(pos_q, n_local), base_q, s2, t2)
    cal["abundance"], ev["abundance"] = loc.abundance(pos_c, pos_q, n_local, rng=rng)
    # per cell, for the driving genes' z-scores: at least the noise of a deviance residual, so that a sparse
    # gene's compressed residuals do not outrank the shifted genes
    variance = np.maximum(cal_variance, cov.MIN_SCALE ** 2)
    in_reference = ref_rows >= 0
    ev["common_shift"], cal["common_shift"], shift_found = shift.common_shift(ex_q, ex_c, variance, rng=rng,
                                                                              fit=~in_reference)

    mix = sc_ev["mean"][scale_idx, :n_lat], sc_ev["log_var"][scale_idx, :n_lat]
    cal["latent_density"] = loc.latent_density(*mix, cal["mean"][val_idx, :n_lat])
    ev["latent_density"] = loc.latent_density(*mix, ev["mean"][:, :n_lat], exclude=in_scale)
    ref_lat, q_lat = np.asarray(reference.obsm[f"X_{key}"]), np.asarray(adata.obsm[f"X_{key}"])
    in_train = within(ref_rows, train_idx, reference.n_obs)
    cal["latent_novelty"] = cov.latent_distance(ref_lat[train_idx], ref_lat[val_idx], n_neighbors=n_neighbors)
    ev["latent_novelty"] = cov.latent_distance(ref_lat[train_idx], q_lat, n_neighbors=n_neighbors,
                                               skip_self=in_train >= 0)
    if labels_key is not None:
        labels = reference.obs[labels_key].to_numpy()[train_idx]
        cal["label_uncertainty"] = loc.label_uncertainty(ref_lat[train_idx], labels, ref_lat[val_idx],
                                                         n_neighbors=n_neighbors)
        ev["label_uncertainty"] = loc.label_uncertainty(ref_lat[train_idx], labels, q_lat, n_neighbors=n_neighbors,
                                                        exclude=in_train)
    extras = {"excess": ex_q, "cal_excess": ex_c, "positions": pos_q, "cal_positions": pos_c, "variance": variance,
              "in_reference": in_reference, "top_genes": top_genes,
              "top_scores": top_scores, "new_batch": new_batch, "n_scale_cells": len(scale_idx),
              "shift_found": shift_found}
    return cal, ev, extras


def combined_components(n_calibration: int, extra: dict, *, labels_key: str | None, extra_evidence: bool):
    """Return the components reported and those combined into the coverage; say why any is left out.

    ``extra_evidence`` combines every reported component but a common shift whose direction was
    not used (it is zero then).
    """
    reported = (cov.COMPONENTS + cov.GROUP + cov.LOCAL + cov.SHARED + cov.EXTRA
                + (cov.OPTIONAL if labels_key is not None else ()))
    if extra_evidence:
        return reported, tuple(c for c in reported if c not in cov.SHARED or extra["shift_found"])
    local = cov.LOCAL if n_calibration >= MIN_LOCAL_CALIBRATION else ()
    if not local:
        logg.info(f"    the neighbourhood evidence is reported but not combined: {n_calibration} held-out reference "
                  f"cells, {MIN_LOCAL_CALIBRATION} are needed to calibrate it")
    n_new = int((~extra["in_reference"]).sum())
    if n_new < shift.MIN_CELLS:
        logg.info(f"    the common-shift evidence is reported but not combined: {n_new} query cells that are not "
                  f"reference cells, {shift.MIN_CELLS} are needed to find their shared direction")
    elif not extra["shift_found"]:
        logg.info("    the common-shift evidence is not combined (zero): the held-out reference cells lie in the "
                  "tail of the query's most skewed direction, which would then flag covered cells")
    shared = cov.SHARED if n_new >= shift.MIN_CELLS and extra["shift_found"] else ()
    return reported, cov.COMPONENTS + cov.GROUP + local + shared


def batch_centers(adata, key, residuals, ref_center, n_ref_batches, n_cells, rng):
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
            center[b] = np.median(residuals[np.sort(rng.choice(pool, min(n_cells, len(pool)), replace=False))], axis=0)
    return center, np.where(codes >= n_ref_batches, codes, -1)


def summaries(coverage, flag, groups, genes, excess, variance, n_report, shifts):
    """Per group: cells, median coverage, share uncovered, the drivers of its uncovered cells, its group test.

    ``shifts``: :func:`~sc_vi_ext.diagnostics.coverage_groups.group_shifts`'s result, for the tested groups.
    """
    out = {}
    for g in pd.unique(groups):
        m = np.asarray(groups == g)
        rec = {"n_cells": int(m.sum()), "coverage_median": float(np.median(coverage[m])),
               "frac_uncovered": float(flag[m].mean()), "n_uncovered": int(flag[m].sum())}
        u = m & flag
        if u.any():
            best, z = loc.shifted_genes(excess[u], variance, n_report)
            rec["top_genes"] = [str(genes[i]) for i in best]
            rec["top_genes_shift"] = [float(v) for v in z]
        if str(g) in shifts:
            test = dict(shifts[str(g)])
            z = test.pop("shift_z")
            best = loc.top_by_size(z, n_report)
            rec.update(test, shift_genes=[str(genes[i]) for i in best], shift_genes_z=[float(z[i]) for i in best])
        out[str(g)] = rec
    return out


def log_group_test(shifts: dict, shifted: list, groups: np.ndarray, groupby: str | None) -> None:
    """Say which groups the group test flagged, and which it could not test."""
    if groupby is None:
        logg.info("    no group test: pass groupby (clusters or labels) to test groups of cells")
        return
    if len(shifts) < MIN_GROUPS:
        logg.info(f"    group test: {len(shifts)} group(s) in {groupby!r} with at least {MIN_CELLS} query cells "
                  f"that are not reference cells; {MIN_GROUPS} are needed to score and flag them")
    else:
        logg.info(f"    group test: {len(shifted)} of {len(shifts)} groups shifted from the reference"
                  + (f" ({', '.join(shifted)})" if shifted else ""))
    untested = sorted(set(groups.tolist()) - set(shifts))
    if untested and shifts:
        logg.info(f"    {len(untested)} group(s) not tested, with fewer than {MIN_CELLS} query cells that are not "
                  "reference cells (group shift NaN)")


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
