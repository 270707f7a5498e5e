"""float32 exp, log and log1p that LLVM can vectorise, for the numba kernels.

numba calls libm for ``math.exp`` and ``math.log``: one element at a time, since this
machine's numba has no vector math library (SVML). On a 128 x 2,000 minibatch the fused
likelihood kernel spent 18 ms so, against 3.5 ms for the same work in torch's vectorised
kernels. Written out as arithmetic and bit operations (Cody-Waite range reduction and the
Cephes minimax polynomials, the same method as torch's SLEEF-based kernels), the functions
below vectorise with the loop that calls them. Relative error about 1e-7 (2 ulp), tested
against float64 over the ranges the kernels use.

The functions are compiled without ``reassoc`` fast-math, so the range reductions are
evaluated as written; reductions over a row go through :func:`row_sum` and
:func:`row_max`, which allow reordering so that they vectorise too.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

f32 = np.float32
# 'contract' (fused multiply-add) and no NaN / sign-of-zero care, but no reassociation: see the module text
EXACT = {"contract", "nsz", "arcp"}
JIT = {"nogil": True, "cache": True, "fastmath": EXACT, "error_model": "numpy", "boundscheck": False}


@intrinsic
def as_int32(typingctx, x):  # noqa: ARG001 - numba's intrinsic signature
    """Return the bits of a float32 as an int32."""
    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def as_float32(typingctx, x):  # noqa: ARG001
    """Return an int32's bits as a float32."""
    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_LOG2E, _LN2_HI, _LN2_LO = f32(1.44269504088896341), f32(0.693359375), f32(-2.12194440e-4)
_EXP_LO, _EXP_HI = f32(-87.0), f32(88.0)
_E = [f32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                       5.0000001201e-1)]
E0, E1, E2, E3, E4, E5 = _E
_L = [f32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                       -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
L0, L1, L2, L3, L4, L5, L6, L7, L8 = _L
_SQRT_HALF, ONE, HALF, ZERO = f32(0.707106781186547524), f32(1.0), f32(0.5), f32(0.0)


@numba.njit(inline="always", **JIT)
def exp(x):
    """exp(x) of a float32; inputs are clamped to [-87, 88] (results in the normal range)."""
    x = min(max(x, _EXP_LO), _EXP_HI)
    k = np.floor(x * _LOG2E + HALF)
    r = x - k * _LN2_HI
    r = r - k * _LN2_LO
    p = E0 * r + E1
    p = p * r + E2
    p = p * r + E3
    p = p * r + E4
    p = p * r + E5
    y = p * (r * r) + r + ONE
    return y * as_float32(np.int32((np.int32(k) + np.int32(127)) << np.int32(23)))


@numba.njit(inline="always", **JIT)
def log(x):
    """Natural log of a positive, normal float32."""
    bits = as_int32(x)
    e = np.int32((bits >> np.int32(23)) - np.int32(126))
    m = as_float32(np.int32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F000000)))  # in [0.5, 1)
    small = m < _SQRT_HALF
    e = e - np.int32(1) if small else e
    m = m + m - ONE if small else m - ONE  # f = m - 1 with m in [sqrt(1/2), sqrt(2))
    z = m * m
    p = L0 * m + L1
    p = p * m + L2
    p = p * m + L3
    p = p * m + L4
    p = p * m + L5
    p = p * m + L6
    p = p * m + L7
    p = p * m + L8
    ef = f32(e)
    y = p * m * z + ef * _LN2_LO - HALF * z
    return m + y + ef * _LN2_HI


@numba.njit(inline="always", **JIT)
def log1p(u):
    """log(1 + u) for u >= 0, accurate for small u (1 + u rounded, then corrected: Goldberg's trick)."""
    w = ONE + u
    d = w - ONE
    return u if d == ZERO else log(w) * (u / d)


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy", boundscheck=False)
def row_sum(a):
    """Sum of a 1-D float32 array, in float32 (reordered so that it vectorises)."""
    s = f32(0.0)
    for j in range(a.shape[0]):
        s += a[j]
    return s


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy", boundscheck=False)
def row_max(a):
    """Largest element of a 1-D float32 array."""
    m = a[0]
    for j in range(1, a.shape[0]):
        m = max(m, a[j])
    return m
