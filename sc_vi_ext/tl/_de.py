"""``tl.differential_expression``: the Bayesian scVI test, written like ``sc.tl.rank_genes_groups``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._progress import tqdm
from ..model_store import gene_alignment, stored_loader
from ..module import VAE
from ..threads import cpu_threads
from ._expression import all_batches, decode_scale
from ._shared import check_free, sample_latent
from ._utils import stored_model

MODES = ("change", "vanilla")
_BF_EPS = 1e-8  # keeps the log Bayes factor finite at probability 0 or 1
# record arrays written under key_added, with scanpy's dtypes for its own five fields
_DTYPES = {"names": "O", "scores": "float32", "logfoldchanges": "float32", "pvals": "float64",
           "pvals_adj": "float64", "bayes_factor": "float64", "proba_de": "float64", "is_de_fdr": "bool",
           "lfc_mean": "float32", "lfc_std": "float32", "mean_group": "float32", "mean_reference": "float32"}


def draw_scales(module: VAE, adata: AnnData, key: str, pool: np.ndarray, n_samples: int, codes,
                rng: np.random.Generator, gen: torch.Generator, batch_size: int, dev: str) -> np.ndarray:
    """``n_samples`` draws of the gene proportions from the posterior mixture of the cells ``pool``.

    Each draw is a random cell of ``pool`` and a random z ~ q(z | x) of it (cells are
    drawn without replacement while there are enough, else each cell is drawn equally
    often). Returns (n_samples, genes) float32 in random order.
    """
    if len(pool) >= n_samples:
        cells, reps = rng.choice(pool, n_samples, replace=False), 1
    else:
        cells, reps = pool, -(-n_samples // len(pool))
    parts = []
    for mb in stored_loader(adata, key, np.sort(cells), batch_size=batch_size, device=dev):
        mean, log_var = module.inference(mb.x, mb.batch, mb.cov)
        chunk = max(1, batch_size // len(mb.idx))  # draws per pass: at most ~batch_size rows decoded at once
        for lo in range(0, reps, chunk):
            z = sample_latent(mean, log_var, min(chunk, reps - lo), gen)
            parts.append(decode_scale(module, z, codes, mb.batch, mb.cov).reshape(-1, module.n_genes).cpu().numpy())
    draws = np.concatenate(parts)
    return draws[rng.choice(len(draws), n_samples, replace=False)]


def posterior_fdr(proba: np.ndarray) -> np.ndarray:
    """Posterior expected FDR of the set of genes at least as probable as each gene.

    Genes sorted by decreasing probability of DE; the set of the top k has expected FDR
    mean(1 - p) over its genes, non-decreasing in k. Tied genes share the value of the
    whole tie, so a set is never split inside a tie.
    """
    order = np.argsort(-proba, kind="stable")
    p = proba[order]
    running = np.cumsum(1 - p) / np.arange(1, len(p) + 1)
    last = np.searchsorted(-p, -p, side="right") - 1
    out = np.empty_like(running)
    out[order] = running[last]
    return out


def compare(ha: np.ndarray, hb: np.ndarray, *, mode: str, delta: float, pseudocount: float, fdr: float) -> dict:
    """Per-gene statistics of paired draws ``ha``, ``hb`` (pairs, genes) of two groups."""
    lfc = np.log2(ha + pseudocount) - np.log2(hb + pseudocount)
    cut = delta if mode == "change" else 0.0
    up, down = (lfc > cut).mean(0), (lfc < -cut).mean(0)
    proba = up + down if mode == "change" else up
    p_de = proba if mode == "change" else np.maximum(up, 1 - up)  # vanilla: the likelier direction
    q = posterior_fdr(p_de)
    return {
        "scores": up - down,
        "logfoldchanges": np.median(lfc, 0),
        "pvals": 1 - p_de,
        "pvals_adj": q,
        "bayes_factor": np.log(proba + _BF_EPS) - np.log(1 - proba + _BF_EPS),
        "proba_de": proba,
        "is_de_fdr": q <= fdr,
        "lfc_mean": lfc.mean(0),
        "lfc_std": lfc.std(0),
        "mean_group": ha.mean(0) * 1e4,
        "mean_reference": hb.mean(0) * 1e4,
    }


def _groups_of(adata: AnnData, groupby: str, groups, reference: str) -> tuple[np.ndarray, list[str]]:
    if groupby not in adata.obs:
        raise KeyError(f"groupby {groupby!r} is not a column of adata.obs.")
    col = adata.obs[groupby]
    if col.isna().any():
        raise ValueError(f"adata.obs[{groupby!r}] has missing values.")
    labels = col.astype(str).to_numpy()
    cats = [str(c) for c in (col.cat.categories if hasattr(col, "cat") else pd.unique(labels))]
    cats = [c for c in cats if (labels == c).any()]
    if reference != "rest" and reference not in cats:
        raise ValueError(f"reference {reference!r} is neither 'rest' nor a category of adata.obs[{groupby!r}] {cats}.")
    if groups is None:
        chosen = cats
    else:
        chosen = [str(g) for g in ([groups] if isinstance(groups, str) else groups)]
        unknown = [g for g in chosen if g not in cats]
        if unknown:
            raise ValueError(f"groups {unknown} are not categories of adata.obs[{groupby!r}] {cats}.")
    chosen = [g for g in chosen if g != reference]
    if not chosen:
        raise ValueError("No group left to test.")
    if reference == "rest" and len(cats) < 2:
        raise ValueError(f"adata.obs[{groupby!r}] has a single category: there is no 'rest' to compare with.")
    return labels, chosen


def _test_groups(module: VAE, adata: AnnData, key: str, labels: np.ndarray, chosen: list[str], reference: str, *,
                 n_samples: int, n_cells_per_group: int, codes, rng: np.random.Generator, gen: torch.Generator,
                 batch_size: int, dev: str, progress: bool, compare_kw: dict) -> dict[str, dict]:
    """Draw each group's and its reference's posterior proportions and compare them (per group, per gene)."""

    def pool(mask: np.ndarray) -> np.ndarray:
        cells = np.flatnonzero(mask)
        return rng.choice(cells, n_cells_per_group, replace=False) if len(cells) > n_cells_per_group else cells

    def draws(mask: np.ndarray) -> np.ndarray:
        return draw_scales(module, adata, key, pool(mask), n_samples, codes, rng, gen, batch_size, dev)

    stats, ref_draws = {}, None
    with torch.no_grad():
        for g in tqdm(chosen, desc="differential expression", unit="group", disable=not progress, leave=False):
            ha = draws(labels == g)
            if reference == "rest":
                hb = draws(labels != g)
            else:  # one fixed reference: draw it once, re-pair it for each group
                if ref_draws is None:
                    ref_draws = draws(labels == reference)
                hb = ref_draws[rng.permutation(n_samples)]
            stats[g] = compare(ha, hb, **compare_kw)
    return stats


def _ranked_records(stats: dict[str, dict], model_genes) -> dict[str, np.recarray]:
    """Lay results out as ``rank_genes_groups`` does: per field a record array, a column per group."""
    names = np.asarray(model_genes, dtype=object)
    ranked = {c: {} for c in _DTYPES}
    for g, s in stats.items():
        order = np.lexsort((-s["logfoldchanges"], -s["scores"]))
        ranked["names"][g] = names[order]
        for c in _DTYPES:
            if c != "names":
                ranked[c][g] = s[c][order]
    return {c: pd.DataFrame(ranked[c]).to_records(index=False, column_dtypes={g: dt for g in stats})
            for c, dt in _DTYPES.items()}


@doc_params()
@cpu_threads
def differential_expression(
    adata: AnnData,
    *,
    key: str = "vae",
    groupby: str,
    groups: Sequence[str] | None = None,
    reference: str = "rest",
    mode: str = "change",
    delta: float = 0.25,
    fdr: float = 0.05,
    n_samples: int = 100,
    n_cells_per_group: int = 500,
    pseudocount: float = 1e-8,
    key_added: str = "vae_de",
    random_state: int = 0,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Bayesian differential expression of each group against a reference (scVI).

    For each group and its reference, ``n_samples`` draws of the normalised expression
    h (the decoder's gene proportions) are taken from the posterior of random cells of
    each side (Lopez et al. 2018): a draw is a random cell and a z ~ q(z | x) of it. With a
    batch covariate, h is averaged over every batch of the model (batch-corrected). The
    draws are paired and LFC = log2(h_a + pseudocount) - log2(h_b + pseudocount) per gene.

    ``mode="change"`` (Boyeau et al. 2019): the probability of DE is p = P(``|LFC|`` > delta).
    ``mode="vanilla"``: p = P(h_a > h_b), and DE means the likelier direction, with
    probability max(p, 1 - p). The log Bayes factor is log(p / (1 - p)). The genes
    reported DE at level ``fdr`` are the largest set, taken in order of decreasing
    probability of DE, whose posterior expected false discovery rate, the mean of
    1 - probability over the set, is at most ``fdr``.

    The result has the layout of ``sc.tl.rank_genes_groups``, so ``sc.get.rank_genes_groups_df``
    and the ``sc.pl.rank_genes_groups*`` plots read it with ``key=key_added``. Genes are
    sorted per group by ``scores`` = P(LFC > delta) - P(LFC < -delta) (delta = 0 in
    vanilla mode), a signed probability in [-1, 1]: up-regulated genes first, the
    down-regulated last, as with scanpy's statistics; ties go by the median LFC.

    Parameters
    ----------
    {adata}
    {key}
    groupby
        Column of ``adata.obs`` with the groups (cell types, clusters).
    groups
        Groups to test; all (but the reference) when None.
    reference
        ``"rest"`` (all other cells) or one category of ``groupby``.
    mode
        ``"change"`` or ``"vanilla"``.
    delta
        Smallest ``|LFC|`` (log2) that counts as a change in ``"change"`` mode.
    fdr
        Target posterior expected false discovery rate for ``is_de_fdr``.
    n_samples
        Posterior draws per side and group (and pairs compared); probabilities have a
        resolution of 1 / n_samples. Memory: two n_samples x genes float32 arrays.
    n_cells_per_group
        Cells of each side drawn from (a random subset when a side has more).
    pseudocount
        Added to the proportions (which sum to 1 per cell) before the log; raise it
        (e.g. 1e-5) to damp the fold changes of barely expressed genes.
    key_added
        Name of the result in ``adata.uns``.
    {random_state}
    {batch_size}
    {device}
    {progress}
    {copy}

    Returns
    -------
    None, or a copy with ``copy=True``; writes to ``adata.uns[key_added]``

    ``params``
        ``groupby``, ``reference``, ``method`` (``"scvi_change"`` or ``"scvi_vanilla"``),
        ``use_raw`` (False), ``layer`` (None), ``corr_method`` (``"posterior_expected_fdr"``)
        and the settings of this call.
    ``names``
        Record array, one field per group: gene names sorted by ``scores``.
    ``scores``
        Signed probability of DE, P(LFC > delta) - P(LFC < -delta).
    ``logfoldchanges``
        Posterior median of the LFC (log2).
    ``pvals``
        1 - probability of DE: a p-value-like number, not a p-value.
    ``pvals_adj``
        Posterior expected FDR of the set of genes at least as probably DE as this one.
    ``bayes_factor``, ``proba_de``
        The natural log Bayes factor and p as defined above.
    ``is_de_fdr``
        Whether the gene is in the set reported DE at level ``fdr``.
    ``lfc_mean``, ``lfc_std``
        Posterior mean and standard deviation of the LFC.
    ``mean_group``, ``mean_reference``
        Mean normalised expression (per 10,000 counts) of the draws of each side.

    Every field after ``names`` is a record array in the same gene order as ``names``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}.")
    if n_samples < 1 or n_cells_per_group < 1:
        raise ValueError("n_samples and n_cells_per_group must be at least 1.")
    labels, chosen = _groups_of(adata, groupby, groups, reference)
    module, dev = stored_model(adata, key, device)
    model_genes, _ = gene_alignment(adata, key)  # the draws are in the model's gene order
    check_free(adata, key, "uns", key_added)  # e.g. a model stored under "vae_de"
    adata = adata.copy() if copy else adata
    codes = all_batches(module)
    rng = np.random.default_rng(random_state)
    gen = torch.Generator(device=dev).manual_seed(random_state)
    start = logg.info(f"testing {len(chosen)} group(s) of {groupby!r} against {reference!r} with {key!r} "
                      f"({mode} mode, {n_samples} posterior draws per side)")

    stats = _test_groups(module, adata, key, labels, chosen, reference, n_samples=n_samples,
                         n_cells_per_group=n_cells_per_group, codes=codes, rng=rng, gen=gen, batch_size=batch_size,
                         dev=dev, progress=progress, compare_kw=dict(mode=mode, delta=delta, pseudocount=pseudocount,
                                                                     fdr=fdr))
    adata.uns[key_added] = {
        "params": {
            "groupby": groupby, "reference": reference, "method": f"scvi_{mode}", "use_raw": False, "layer": None,
            "corr_method": "posterior_expected_fdr", "key": key, "mode": mode, "delta": float(delta),
            "fdr": float(fdr), "n_samples": int(n_samples), "n_cells_per_group": int(n_cells_per_group),
            "pseudocount": float(pseudocount), "batch_corrected": codes is not None, "random_state": random_state,
        },
        **_ranked_records(stats, model_genes),
    }
    n_de = {g: int(s["is_de_fdr"].sum()) for g, s in stats.items()}
    logg.info(f"    genes DE at posterior expected FDR {fdr}: " + ", ".join(f"{g} {n}" for g, n in n_de.items()))
    logg.info("    finished", time=start, deep=f"added\n    {key_added!r}, sorted np.recarrays of names, scores, "
              "logfoldchanges, pvals, pvals_adj, bayes_factor, proba_de, is_de_fdr (adata.uns)")
    return adata if copy else None
