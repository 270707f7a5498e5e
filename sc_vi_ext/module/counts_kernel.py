"""The training step's likelihood in one pass: softmax, library, NB / ZINB / Poisson and the gradient.

For one minibatch (cells x genes) the kernel takes the decoder's gene logits (and the
zero-inflation logits), the log library sizes and the dispersion, and in one pass over each
cell's row computes log p(x | z) with every gamma and log(x!) term, and its gradient in the
logits, the zero-inflation logits, the log library and the dispersion, in closed form
(the formulas are in :mod:`sc_vi_ext.module.dense`; with G = x - (x + theta)(1 - a) mu / (theta + mu)
the gradient in log mu, the gradient in a gene logit is G - softmax * sum(G)). Written for
numba with the vectorisable math of :mod:`~sc_vi_ext.module.vecmath`; the rows of a
minibatch are split over the torch threads (the kernel releases the GIL), in a fixed
partition, so that the result does not depend on scheduling.

Per (cell, gene) the kernel reads x, the logits and writes the gradients once; the gamma
terms for integer counts up to ``GAMMA_TABLE_SIZE`` come from a per-step (dispersions, genes,
K) table, larger or fractional counts use lgamma and digamma.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from . import vecmath as vm
from .vecmath import ONE, ZERO, f32

POISSON, NB, ZINB = 0, 1, 2


@numba.njit(**vm.JIT)
def _digamma(x):
    """Digamma of x > 0 (float64): recurrence to x >= 6, then the asymptotic series."""
    r = 0.0
    while x < 6.0:
        r -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    return r + math.log(x) - 0.5 / x - f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))


@numba.njit(**vm.JIT)
def gamma_tables(theta, k_max, table, dtable):
    """Fill ``table[d, k, g]`` = sum_{m<=k} log(theta_dg + m) - log((k + 1)!) and ``dtable``, its theta-derivative."""
    n_d, n_g = theta.shape
    for d in range(n_d):
        acc = np.zeros(n_g, np.float32)
        dacc = np.zeros(n_g, np.float32)
        lfact = f32(0.0)
        for k in range(k_max):
            lfact += f32(math.log(k + 1.0))
            kf = f32(k)
            for g in range(n_g):
                t = theta[d, g] + kf
                acc[g] += vm.log(t)
                dacc[g] += ONE / t
                table[d, k, g] = acc[g] - lfact
                dtable[d, k, g] = dacc[g]


@numba.njit(**vm.JIT)
def _nonzero_terms(cols, vals, th, tab, dtab, gth, mode, grad):
    """Gamma and log(x!) terms of one row's non-zero counts (``cols``, ``vals``); their theta-gradient into ``gth``."""
    k_max = tab.shape[0]
    val = 0.0
    for p in range(cols.shape[0]):
        j, xv = cols[p], vals[p]
        k = int(xv)
        small = (k == xv) & (k <= k_max)
        if mode == POISSON:
            val -= tab[k - 1, 0] if small else math.lgamma(xv + 1.0)
        elif small:
            val += tab[k - 1, j]
            if grad:
                gth[j] += dtab[k - 1, j]
        else:
            t = float(th[j])
            val += math.lgamma(xv + t) - math.lgamma(t) - math.lgamma(xv + 1.0)
            if grad:
                gth[j] += f32(_digamma(xv + t) - _digamma(t))
    return val


@numba.njit(inline="always", **vm.JIT)
def _poisson_entries(xr, lr, buf, scale, vr):
    """Per entry of one row: the value x l - mu into ``vr``, G = x - mu into ``buf`` (which holds exp(l - max))."""
    for j in range(xr.shape[0]):
        xv = xr[j]
        mu = buf[j] * scale
        vr[j] = xv * lr[j] - mu
        buf[j] = xv - mu


@numba.njit(inline="always", **vm.JIT)
def _nb_common(xv, t, it, mu):
    """U = mu / theta, q = 1 / (1 + u), s = log(1 + u) and r = mu / (theta + mu) of one entry, with one division."""
    u = mu * it
    w = ONE + u
    q = ONE / w
    s = vm.log(w) - ((w - ONE) - u) * q  # log1p(u): log of the rounded 1 + u, corrected to first order
    return s, u * q, q


@numba.njit(inline="always", **vm.JIT)
def _nb_entries(xr, lr, th, lth, ith, buf, scale, vr, gtr):
    """NB per entry: value into ``vr``, the theta-gradient into ``gtr``, G into ``buf``."""
    for j in range(xr.shape[0]):
        xv, t = xr[j], th[j]
        mu = buf[j] * scale
        s, r, q = _nb_common(xv, t, ith[j], mu)
        vr[j] = xv * (lr[j] - s - lth[j]) - s * t
        gtr[j] = (r - s) - xv * q * ith[j]  # x / (theta + mu) = x q / theta
        buf[j] = xv - (xv + t) * r


@numba.njit(inline="always", **vm.JIT)
def _zinb_entries(xr, lr, zr, th, lth, ith, buf, scale, vr, gtr, gzr):
    """ZINB per entry: value into ``vr``, theta- and zero-inflation gradients into ``gtr``, ``gzr``, G into ``buf``."""
    for j in range(xr.shape[0]):
        xv, t, z = xr[j], th[j], zr[j]
        mu = buf[j] * scale
        s, r, q = _nb_common(xv, t, ith[j], mu)
        st = s * t
        ez = vm.exp(-abs(z))
        iz = ONE / (ONE + ez)
        sgz = iz if z >= ZERO else ez * iz
        w = z + st
        ew = vm.exp(-abs(w))
        iw = ONE / (ONE + ew)
        zero = ONE if xv == ZERO else ZERO
        # at a zero: log(pi + (1 - pi) NB(0)) = softplus(z + st) - softplus(z) - st; a = the dropout's share.
        # softplus(y) = max(y, 0) + log(1 + exp(-|y|)): the log of the rounded sum is within 1e-7 absolute
        a = zero * (iw if w >= ZERO else ew * iw)
        spw = zero * (max(w, ZERO) + vm.log(ONE + ew))
        vr[j] = xv * (lr[j] - s - lth[j]) - st - (max(z, ZERO) + vm.log(ONE + ez)) + spw
        keep = ONE - a
        gzr[j] = a - sgz
        gtr[j] = keep * (r - s) - xv * q * ith[j]
        buf[j] = xv - (xv + t) * keep * r


@numba.njit(**vm.JIT)
def _rows(lo, hi, mode, grad, x, indptr, cols, vals, logits, zi, lib, theta, log_theta, inv_theta, tidx, tab, dtab, out,
          gl, gz, gth, glib, buf, vr):
    """Rows ``lo:hi`` of the kernel (see the module text); ``buf``, ``vr``: this thread's (genes,) scratch rows."""
    n_g = x.shape[1]
    for i in range(lo, hi):
        xr, lr = x[i], logits[i]
        d = tidx[i] if mode != POISSON else 0
        m = vm.row_max(lr)
        for j in range(n_g):  # exp(l - max) into buf
            buf[j] = vm.exp(lr[j] - m)
        ssum = vm.row_sum(buf)
        inv = ONE / ssum
        lse = m + vm.log(ssum)
        scale = vm.exp(lib[i]) * inv
        if mode == POISSON:
            _poisson_entries(xr, lr, buf, scale, vr)
        elif mode == NB:
            _nb_entries(xr, lr, theta[d], log_theta[d], inv_theta[d], buf, scale, vr, gth[i])
        else:
            _zinb_entries(xr, lr, zi[i], theta[d], log_theta[d], inv_theta[d], buf, scale, vr, gth[i], gz[i])
        a, b = indptr[i], indptr[i + 1]
        val = float(vm.row_sum(vr)) + float(vm.row_sum(vals[a:b])) * float(lib[i] - lse)
        out[i] = val + _nonzero_terms(cols[a:b], vals[a:b], theta[d], tab[d], dtab[d], gth[i], mode, grad)
        if grad:
            gsum = vm.row_sum(buf)
            glib[i] = gsum
            ginv = gsum * inv
            glr = gl[i]
            for j in range(n_g):  # G - softmax * sum(G); buf holds G, the softmax is recomputed
                glr[j] = buf[j] - vm.exp(lr[j] - m) * ginv


def run(mode: int, grad: bool, arrays: tuple, *, pool=None, n_threads: int = 1) -> None:  # noqa: FBT001
    """Run the kernel over all rows in ``n_threads`` fixed blocks (``pool``: an executor for all but the first).

    ``arrays``: x, the non-zeros (indptr, columns, values), logits, zero-inflation logits, log
    library, theta, log theta, 1 / theta, theta's row per cell, the gamma tables, then the
    outputs: value, gradients in the logits, zero-inflation logits, theta (per entry) and log library.
    """
    n, n_genes = arrays[0].shape
    blocks = max(1, min(n_threads if pool is not None else 1, n // 2))
    bounds = np.linspace(0, n, blocks + 1).astype(np.int64)

    def block(k):
        _rows(bounds[k], bounds[k + 1], mode, grad, *arrays, np.empty(n_genes, np.float32),
              np.empty(n_genes, np.float32))

    futures = [pool.submit(block, k) for k in range(1, blocks)]
    block(0)
    for f in futures:
        f.result()
