"""The common shift: a minority of query cells shifted together in many genes, each within its noise."""

import numpy as np
from sklearn.metrics import roc_auc_score

from sc_vi_ext.diagnostics.coverage_shift import _skewed_direction, common_shift


def _excess(rng, n_query=2000, n_cal=600, n_genes=500, share=0.12, n_shifted=150, size=0.35):
    """Unit-noise excess of query and calibration cells; a share of the query shifted by ``size`` in some genes."""
    q = rng.normal(size=(n_query, n_genes)).astype(np.float32)
    c = rng.normal(size=(n_cal, n_genes)).astype(np.float32)
    altered = rng.uniform(size=n_query) < share
    genes = rng.choice(n_genes, n_shifted, replace=False)
    q[np.ix_(altered, genes)] += size * rng.choice([-1.0, 1.0], n_shifted)
    return q, c, altered


def test_finds_a_shift_no_gene_carries():
    rng = np.random.default_rng(0)
    q, c, altered = _excess(rng)
    stat, cal, found = common_shift(q, c, np.ones(q.shape[1]), n_directions=10, rng=np.random.default_rng(1))
    assert found
    assert roc_auc_score(altered, stat) > 0.97
    # each gene alone, and a chi-square over all genes, cannot see it
    assert roc_auc_score(altered, (q ** 2).sum(1)) < 0.75
    assert roc_auc_score(altered, np.abs(q).max(1)) < 0.6
    # at the calibration cells' 95th percentile most altered cells and few others are above
    cut = np.quantile(cal, 0.95)
    assert (stat[altered] > cut).mean() > 0.8 and (stat[~altered] > cut).mean() < 0.08


def test_null_query_is_like_the_calibration_cells():
    rng = np.random.default_rng(2)
    q, c, _ = _excess(rng, share=0.0)
    stat, cal, _ = common_shift(q, c, np.ones(q.shape[1]), n_directions=10, rng=np.random.default_rng(3))
    assert np.isfinite(stat).all() and np.isfinite(cal).all()
    assert 0.01 < (stat > np.quantile(cal, 0.95)).mean() < 0.1  # no direction is fitted to a cell's own noise
    assert abs(np.median(stat)) < 0.2 and abs(np.median(cal)) < 0.2


def test_gene_scale_and_fit_mask():
    rng = np.random.default_rng(4)
    q, c, altered = _excess(rng)
    var = rng.uniform(0.5, 4.0, q.shape[1])
    stat, _, _ = common_shift(q * np.sqrt(var), c * np.sqrt(var), var, n_directions=10, rng=np.random.default_rng(1))
    plain, _, _ = common_shift(q, c, np.ones(q.shape[1]), n_directions=10, rng=np.random.default_rng(1))
    np.testing.assert_allclose(stat, plain, rtol=1e-3, atol=1e-3)  # genes on the scale of their variance
    # cells outside the fit are scored on directions found without them: without any altered cell there is no
    # direction to find; without a random half of them the others still show it, and the left-out ones too
    stat, _, _ = common_shift(q, c, np.ones(q.shape[1]), n_directions=10, rng=np.random.default_rng(1), fit=~altered)
    assert roc_auc_score(altered, stat) < 0.8
    out = altered & (np.random.default_rng(2).uniform(size=len(q)) < 0.5)
    stat, _, found = common_shift(q, c, np.ones(q.shape[1]), n_directions=10, rng=np.random.default_rng(1), fit=~out)
    assert found and roc_auc_score(altered[out | ~altered], stat[out | ~altered]) > 0.9
    none = np.zeros(len(q), bool)
    none[:5] = True
    stat, cal, found = common_shift(q, c, np.ones(q.shape[1]), n_directions=10, rng=np.random.default_rng(1),
                                    fit=none)
    assert not found and not stat.any() and not cal.any()
    # calibration cells that do not spread along the direction: no evidence, not values of 1e12
    stat, cal, found = common_shift(q, np.zeros_like(c), np.ones(q.shape[1]), n_directions=10,
                                    rng=np.random.default_rng(1))
    assert not found and not stat.any()


def test_a_mostly_altered_query_leaves_the_direction_unused():
    # 70 % altered: the skewed tail is the covered cells, where the held-out cells lie; scored, they would be flagged
    rng = np.random.default_rng(6)
    q, c, altered = _excess(rng, share=0.7)
    stat, cal, found = common_shift(q, c, np.ones(q.shape[1]), n_directions=10, rng=np.random.default_rng(1))
    assert not found and not stat.any() and not cal.any()
    for share in (0.12, 0.3):  # a minority: used
        q, c, altered = _excess(np.random.default_rng(7), share=share)
        stat, cal, found = common_shift(q, c, np.ones(q.shape[1]), n_directions=10, rng=np.random.default_rng(1))
        assert found and (stat[~altered] > np.quantile(cal, 0.95)).mean() < 0.08


def test_skewed_direction_recovers_a_skewed_axis():
    rng = np.random.default_rng(5)
    y = rng.normal(size=(3000, 6))
    y[:, 2] = rng.exponential(size=3000)  # one skewed axis, the others symmetric
    y = (y - y.mean(0)) / y.std(0)
    mix = np.linalg.qr(rng.normal(size=(6, 6)))[0]  # rotated, so no start is on it
    a = _skewed_direction(y @ mix)
    axis = mix[2]  # the skewed axis in the rotated coordinates
    assert a @ axis > 0.95  # found, its tail positive
    a_neg = _skewed_direction(-(y @ mix))
    assert a_neg @ -axis > 0.95
