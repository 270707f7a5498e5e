"""``tl.reference_coverage``: which query cells the reference model does not explain."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._progress import tqdm
from ..diagnostics import coverage as cov
from ..diagnostics import coverage_groups as groups_test
from ..diagnostics import coverage_shift as shift
from ..diagnostics.coverage_local import bh_adjust
from ..inputs import group_labels
from ..threads import cpu_threads
from ._coverage_parts import (
    MIN_LOCAL_CALIBRATION,
    checked_inputs,
    combined_components,
    evidence,
    log_group_test,
    merge_into_trust,
    summaries,
)
from ._utils import stored_model

FEW_CALIBRATION_CELLS = 100  # below this, the coverage's tail is coarse: said in the log


@doc_params(min_local=str(MIN_LOCAL_CALIBRATION), nb_weight=f"{cov.SUMMARY_WEIGHT:g}",
            min_shared=str(shift.MIN_CELLS), shared_weight=f"{cov.WEIGHTS['common_shift']:g}",
            min_group=str(groups_test.MIN_CELLS), min_groups=str(groups_test.MIN_GROUPS))
@cpu_threads
def reference_coverage(
    adata: AnnData,
    *,
    reference: AnnData,
    key: str = "vae",
    alpha: float = 0.05,
    groupby: str | None = None,
    labels_key: str | None = None,
    n_top_genes: int = 10,
    n_group_genes: int = 20,
    n_neighbors: int = 15,
    n_local: int = 30,
    extra_evidence: bool = False,
    n_scale_cells: int = 1000,
    max_steps: int = 20,
    batch_size: int = 256,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Score how well the reference model explains each cell; flag the cells it does not cover.

    Run after :func:`vae_map` (or on the reference itself). Four pieces of evidence per cell come
    from the reference's generative model at the cell's own best latent point z* (the
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

    One from the cells' places alone, always in the coverage:

    ``abundance``
        Query cells crowding a place where the reference has few cells (a differential
        abundance test per cell, as Milo does per neighbourhood): at z*, in the joint graph of
        the reference's held-out cells and as many query cells (the query split at random into
        chunks of that size, or the held-out cells where the query is smaller), the z-score of
        the kernel-weighted share of the cell's ``n_local`` nearest cells (at most a third of the
        smaller set) that come from its own set.
        Held-out and query cells are both new to the model, and with sets of equal size a
        held-out cell's own share has the null distribution of a query cell's: a cell type the
        reference lacks, even one that its residuals do not reveal.

    A sixth enters the coverage where the reference holds at least {min_local} held-out cells (fewer
    cannot calibrate it: the statistic of a query's tight neighbourhoods then runs above that of
    the held-out cells' sparse ones, and too many covered cells are flagged):

    ``neighbourhood``
        Standardised chi-square over genes of the mean residual excess of the cell's ``n_local``
        nearest query cells at z* (each cell's residuals minus those of its ``n_local`` nearest
        reference training cells, less the held-out cells' median excess), its variance taken
        with the overlap of the cells' baselines: a small shift shared by a region of cells,
        such as a new state of a known type.

    A seventh enters the coverage where the query holds at least {min_shared} cells that are not
    reference cells (fewer cannot find the direction), with weight {shared_weight} in the
    combination:

    ``common_shift``
        The cell's residual excess (as for ``neighbourhood``) along the direction a minority of
        the query's cells shift together: the most skewed direction among the leading principal
        components of the excess of one random half of the query, the other half scored on it
        (and vice versa), as a robust z-score with the held-out cells' spread. A type that
        differs by small changes spread over many genes, or a new state of a known type, which
        no gene and no chi-square over all genes can carry. It assumes that most of the query is
        covered; where the held-out cells lie in the direction's tail (as where most of the
        query is altered) it is zero and left out.

    Two more are computed and reported, but enter the coverage only with ``extra_evidence=True``
    (which also combines ``neighbourhood`` and ``common_shift`` whatever the numbers of cells):

    ``latent_density``
        Low density of the cell's encoder mean under the encoder distributions of the reference
        training cells that set the residual scale: a cell in an empty part of the latent space.
    ``label_uncertainty``
        Only with ``labels_key``: disagreement of the reference labels among the cell's
        ``n_neighbors`` nearest reference training cells.

    Each is compared with the reference's held-out cells of similar depth and turned into an
    upper-tail p-value; Fisher's combination of those in the coverage (the -2 log p of
    ``abundance`` and ``neighbourhood``, each one summary of many cells, weighted {nb_weight}x, as
    much as the four per-cell components together: they read the same residuals and move
    together) is calibrated on the same held-out cells, so ``coverage`` is close to uniform on
    typical reference cells and ``coverage < alpha`` flags about ``alpha`` of them. For a batch
    the reference never saw, the leftover batch effect of the mapping is not counted as novelty:
    each gene's residual location is taken from the batch's own cells, and each component loses
    the batch-wide offset and widening of its lower quantiles (this assumes that most of a new
    batch is covered). See the documentation page "Reference coverage" for what each part signals.

    With ``groupby`` given, a group test per group of at least {min_group} query cells (cells that are
    reference cells, or have no group, are in none), where single cells cannot carry the signal
    (a new state of a known type): the group's mean residual excess against that of its matched
    controls, the reference's held-out cells nearest to its cells at z*, as a mean squared
    z-score over genes; its permutation p-value (cells and controls exchanged),
    Benjamini-Hochberg adjusted over the groups; and a robust z-score of its size-free effect
    among the query's groups (at least {min_groups} of them), since a batch the reference never saw
    leaves every group a little off. A group is flagged where both the adjusted p-value and the
    score's normal tail are below ``alpha``.

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
        novel cells caught). Also the group test's level: its false-discovery rate and its
        score's tail (per group: about this share of covered groups where all are a little off).
    groupby
        Column of ``adata.obs`` for the group summaries, their driving genes and the group test
        (clusters or labels); None: the summaries per the reference's ``batch_key`` when it has
        one, else of all cells together, and no group test.
    labels_key
        Column of ``reference.obs`` with cell labels; given, ``label_uncertainty`` is computed.
    n_top_genes
        Genes per cell in the programme score and listed as its drivers.
    n_group_genes
        Genes listed per group in ``groups[...]["top_genes"]``.
    n_neighbors
        Reference training cells in the latent distance and the label uncertainty.
    n_local
        Cells per neighbourhood in the ``neighbourhood`` and ``abundance`` components (and
        reference training cells the residual excess is taken against).
    extra_evidence
        If True, ``latent_density``, ``neighbourhood``, ``common_shift`` (and ``label_uncertainty``
        with ``labels_key``) also enter Fisher's combination; False (default): the coverage rests on
        the five components above, ``neighbourhood`` where {min_local} or more held-out reference
        cells calibrate it and ``common_shift`` where the query holds {min_shared} or more new cells;
        the others are only reported.
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
        Each component (``model_miss``, ``programme``, ``latent_novelty``, ``encoder_miss``,
        ``abundance``, ``latent_density``, ``neighbourhood``, and ``label_uncertainty`` with ``labels_key``)
        and its p-value against depth-matched reference held-out cells, whether or not it
        enters the coverage.
    ``adata.obs[key + "_neighbourhood_fdr"]``
        Benjamini-Hochberg adjustment of the ``neighbourhood`` p-values over the query's cells.
    ``adata.obs[key + "_group_shift"]``, ``[key + "_group_shifted"]``
        The group test per cell: its group's robust score (NaN for a group not tested or not
        scored) and whether its group is flagged.
    ``adata.obs[key + "_coverage_genes"]``
        For uncovered cells, their ``n_top_genes`` driving genes, comma-separated ("" otherwise).
    ``adata.obs[key + "_trust"]``, ``[key + "_untrusted"]``
        Only where :func:`trust_score` was run: trust becomes min(encoder trust, coverage) and an
        uncovered cell is untrusted (the encoder-only values stay in ``[key + "_trust_encoder"]``).
    ``adata.uns[key]["coverage"]``
        ``params``, ``threshold`` (alpha), ``calibration`` (what the coverage was calibrated
        on: ``n_cells`` held-out reference cells, ``frac_flagged`` of them, ``n_scale_cells``),
        ``components`` (those combined into the coverage), ``weights`` (their factors in the
        combination), ``common_shift_used`` (whether the common shift's direction was used; else
        the component is zero), ``frac_uncovered``, ``groupby`` and
        ``groups``: per group ``n_cells``, ``coverage_median``, ``frac_uncovered``,
        ``n_uncovered`` and, where it has uncovered cells, ``top_genes`` (the ``n_group_genes``
        genes whose mean residual excess over its uncovered cells is largest in size) and
        ``top_genes_shift`` (their standardised shifts: mean excess over its standard error, each
        gene's per-cell sd taken as at least 1, a deviance residual's noise); where the group was
        tested, ``shift_statistic``, ``shift_pvalue``, ``shift_fdr``, ``shift_effect``,
        ``shift_score``, ``shift_flagged``, ``n_cells`` and ``n_controls`` (in the test), and
        ``shift_genes`` / ``shift_genes_z`` (the
        ``n_group_genes`` genes whose difference from the controls is largest in size, and its
        z-scores); ``groups_shifted``: the flagged groups; and ``top_genes``:
        a DataFrame of the uncovered cells' driving genes, a row per cell, largest first.
    """
    params = {k: v for k, v in locals().items() if k not in ("adata", "reference", "copy")}
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha!r}.")
    for name, v in (("n_top_genes", n_top_genes), ("n_group_genes", n_group_genes), ("n_neighbors", n_neighbors),
                    ("n_local", n_local), ("n_scale_cells", n_scale_cells), ("max_steps", max_steps)):
        least = 2 if name in ("n_local", "n_scale_cells") else 1
        if int(v) != v or v < least:
            raise ValueError(f"{name} must be an integer of at least {least}"
                             f", not {v!r}.")
    q_module, dev = stored_model(adata, key, device)
    r_module, _ = stored_model(reference, key, device)
    val = checked_inputs(adata, reference, key, groupby, labels_key)
    rng = np.random.default_rng(random_state)
    batch_key = reference.uns[key]["params"].get("batch_key")
    tested = groupby is not None  # the group test runs on the groups the user names, not on the batches
    groupby = groupby or (batch_key if batch_key in adata.obs else None)
    groups, no_group = group_labels(adata, groupby) if groupby else (np.full(adata.n_obs, "all"),
                                                                      np.zeros(adata.n_obs, bool))
    adata = adata.copy() if copy else adata
    start = logg.info(f"scoring the reference coverage of {adata.n_obs} cells under {key!r}")
    if val.sum() < FEW_CALIBRATION_CELLS:
        logg.warning(f"only {int(val.sum())} held-out reference cells to calibrate on: coverage values below "
                     f"about 1/{int(val.sum())} rest on a fitted tail")
    n_batches = -(-min(n_scale_cells, int((~val).sum())) // batch_size) - (-int(val.sum()) // batch_size) \
        - (-adata.n_obs // batch_size)
    bar = tqdm(total=n_batches, desc="reference coverage", unit="batch", disable=not progress)
    cal, ev, extra = evidence(adata, reference, key, q_module, r_module, dev, val=val, labels_key=labels_key,
                              n_top_genes=n_top_genes, n_neighbors=n_neighbors, n_local=n_local,
                              n_scale_cells=n_scale_cells, max_steps=max_steps, batch_size=batch_size, rng=rng,
                              bar=bar)
    reported, components = combined_components(int(val.sum()), extra, labels_key=labels_key,
                                               extra_evidence=extra_evidence)
    weights = {c: cov.WEIGHTS.get(c, 1.0) for c in components}
    stats = {c: ev[c] for c in reported}
    coverage, pvals, cal_cov = cov.combine({c: cal[c] for c in reported}, stats, cal["log_library"],
                                           ev["log_library"], shift_groups=extra["new_batch"], combined=components,
                                           weights=weights)
    top_genes, top_scores = extra["top_genes"], extra["top_scores"]
    flag = coverage < alpha
    shifts = {} if not tested else groups_test.group_shifts(
        groups, extra["excess"], extra["positions"], extra["cal_excess"], extra["cal_positions"], extra["variance"],
        alpha=alpha, rng=rng, exclude=extra["in_reference"] | no_group)
    group_score = pd.Series({g: r["shift_score"] for g, r in shifts.items()}, dtype=float)
    shifted = [g for g, r in shifts.items() if r["shift_flagged"]]
    genes = np.asarray(reference.uns[key]["var_names"]).astype(str)
    adata.obs[f"{key}_coverage"] = coverage
    adata.obs[f"{key}_uncovered"] = flag
    for c in reported:
        adata.obs[f"{key}_{c}"] = stats[c]
        adata.obs[f"{key}_{c}_p"] = pvals[c]
    adata.obs[f"{key}_neighbourhood_fdr"] = bh_adjust(pvals["neighbourhood"])
    adata.obs[f"{key}_group_shift"] = group_score.reindex(groups).to_numpy()
    adata.obs[f"{key}_group_shifted"] = np.isin(groups, shifted)
    adata.obs[f"{key}_coverage_genes"] = np.where(flag, [",".join(genes[i]) for i in top_genes], "")
    top = pd.DataFrame(genes[top_genes[flag]], index=adata.obs_names[flag],
                       columns=[f"gene_{i + 1}" for i in range(top_genes.shape[1])])
    adata.uns[key]["coverage"] = {
        "params": params, "threshold": float(alpha), "groupby": groupby or "",
        "calibration": {"n_cells": int(val.sum()), "cells": "held-out cells of the reference",
                        "frac_flagged": float((cal_cov < alpha).mean()),
                        "n_scale_cells": extra["n_scale_cells"]},
        "components": list(components),
        "common_shift_used": bool(extra["shift_found"]),
        "weights": weights,
        "frac_uncovered": float(flag.mean()),
        "groups": summaries(coverage, flag, groups, genes, extra["excess"], extra["variance"], n_group_genes, shifts),
        "groups_shifted": shifted,
        "top_genes": top,
    }
    merged = merge_into_trust(adata, key)
    text = f"{100 * flag.mean():.1f}% of cells uncovered (coverage < {alpha:g})"
    bar.set_postfix_str(text, refresh=True)
    bar.close()
    logg.info(f"    {text}; {100 * (cal_cov < alpha).mean():.1f}% of {int(val.sum())} held-out reference cells")
    log_group_test(shifts, shifted, groups, groupby if tested else None)
    logg.info("    finished", time=start, deep=f"added\n    '{key}_coverage', '{key}_uncovered', the components "
              f"and their p-values, '{key}_group_shift', '{key}_group_shifted' (adata.obs)\n"
              f"    'coverage' (adata.uns['{key}'])"
              + (f"\n    updated '{key}_trust', '{key}_untrusted' with the coverage" if merged else ""))
    return adata if copy else None
