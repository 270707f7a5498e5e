"""log p(x | z) of a minibatch from the decoder's logits in one fused kernel, as a torch autograd function.

:func:`log_px_from_logits` is the VAE's likelihood on CPU where it applies (one latent
sample, a dispersion per gene or per gene and batch, float32): the numba kernel of
:mod:`~sc_vi_ext.module.counts_kernel` computes the value and, in the same pass, the
gradient in every input, so the backward pass is a scaling by the incoming gradient. It
equals the plain path (softmax, library, :func:`~sc_vi_ext.module.distributions.log_zinb`),
value and gradient (tested for the three likelihoods and both dispersions). Where it does
not apply, or numba cannot compile here, the model takes the plain path (same numbers to
float32 rounding); ``SC_VI_EXT_NO_NUMBA=1`` forces that.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .fused import GAMMA_TABLE_SIZE

_LOG = logging.getLogger(__name__)
MODES = {"poisson": 0, "nb": 1, "zinb": 2}
_state = {"failed": False, "pool": None, "pool_size": 0}


def available() -> bool:
    """Whether the fused kernel may be used (numba compiles here and has not failed before)."""
    return not _state["failed"] and not os.environ.get("SC_VI_EXT_NO_NUMBA")


def ready() -> bool:
    """Whether the kernel runs here: :func:`available`, and a first call on a tiny block went through.

    The first call compiles the kernel (or loads numba's cache); a failure is logged once and the
    plain torch path is used from then on. For callers that cannot fall back mid-way, such as the
    written-out training step.
    """
    if available() and not _state.get("ready"):
        x = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
        _state["ready"] = log_px_from_logits("zinb", x, torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2),
                                             torch.ones(1, 2)) is not None
    return available()


def theta_gradient(g_theta: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, n_disp: int) -> torch.Tensor:
    """Return the gradient in theta (dispersions, genes) from the kernel's per-entry one, cells weighted."""
    if n_disp == 1:
        return (weights @ g_theta)[None]
    return g_theta.new_zeros(n_disp, g_theta.shape[1]).index_add_(0, index, g_theta * weights[:, None])


def _pool(n_threads: int):
    """Return a thread pool of ``n_threads`` workers for the kernel's row blocks (kept between calls)."""
    if n_threads <= 1:
        return None
    if _state["pool_size"] != n_threads:
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=False)
        _state["pool"], _state["pool_size"] = ThreadPoolExecutor(n_threads, thread_name_prefix="sc_vi_ext"), n_threads
    return _state["pool"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _tables(theta: np.ndarray | None, n_genes: int):
    """Return the per-step tables of :func:`~sc_vi_ext.module.counts_kernel.gamma_tables` (log(x!) for Poisson)."""
    from .counts_kernel import gamma_tables

    K = GAMMA_TABLE_SIZE
    if theta is None:
        lf = np.array([math.lgamma(k + 2.0) for k in range(K)], np.float32)
        return lf.reshape(1, K, 1), np.zeros((1, K, 1), np.float32)
    tab = np.empty((theta.shape[0], K, theta.shape[1]), np.float32)
    dtab = np.empty_like(tab)
    gamma_tables(theta, K, tab, dtab)
    return tab, dtab


def kernel_terms(mode: int, x: torch.Tensor, nz, logits: torch.Tensor, zi_logits: torch.Tensor | None,
                 log_library: torch.Tensor, theta: torch.Tensor | None, theta_index: torch.Tensor, *, grad: bool):
    """Run the kernel: per-cell log p(x | z) and, with ``grad``, its gradients per entry.

    Inputs as :func:`log_px_from_logits` takes them after its checks (``nz`` as CSR arrays,
    float32 contiguous blocks). Returns ``(out, g_logits, g_zi, g_log_library, g_theta)``:
    (cells,), (cells, genes), (cells, genes) or None, (cells,), and the gradient in theta per
    entry, (cells, genes) or None; the gradients are unscaled (those of ``out.sum()``) and
    undefined without ``grad``.
    """
    from .counts_kernel import run

    n, g = x.shape
    th = None if theta is None else _np(theta.contiguous())
    tab, dtab = _tables(th, g)
    if th is None:
        th = np.ones((1, g), np.float32)
    log_th, inv_th = np.log(th), np.reciprocal(th)
    out = torch.empty(n)
    gl = torch.empty(n, g)
    gz = torch.empty(n, g) if zi_logits is not None else gl
    gth = torch.empty(n, g) if theta is not None else gl
    glib = torch.empty(n)
    zi = _np(zi_logits) if zi_logits is not None else _np(gl)
    n_threads = torch.get_num_threads()
    arrays = (_np(x), *nz, _np(logits), zi, _np(log_library), th, log_th, inv_th, _np(theta_index), tab, dtab,
              _np(out), _np(gl), _np(gz), _np(gth), _np(glib))
    with torch.profiler.record_function("fused_counts_kernel"):  # a name for the step benchmark's profile
        run(mode, grad, arrays, pool=_pool(n_threads), n_threads=n_threads)
    return out, gl, gz if zi_logits is not None else None, glib, gth if theta is not None else None


class _FusedCounts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode, x, nz, logits, zi_logits, log_library, theta, theta_index):
        need = ctx.needs_input_grad
        grad = any(need[3:7])
        out, gl, gz, glib, gth = kernel_terms(mode, x, nz, logits, zi_logits, log_library, theta, theta_index,
                                              grad=grad)
        if grad:
            ctx.save_for_backward(gl, gz, glib, gth, theta_index)
            ctx.n_disp = 0 if theta is None else theta.shape[0]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gl, gz, glib, gth, tidx = ctx.saved_tensors
        need = ctx.needs_input_grad
        go = grad_out[:, None]
        g_theta = theta_gradient(gth, grad_out, tidx, ctx.n_disp) if need[6] else None
        return (None, None, None, gl * go if need[3] else None, gz * go if need[4] else None,
                glib * grad_out if need[5] else None, g_theta, None)


def applies_to(module, device) -> bool:
    """Whether the training steps of ``module`` on ``device`` go through the kernel (see :func:`applies`)."""
    return (available() and torch.device(device).type == "cpu"
            and (module.likelihood == "poisson" or module.dispersion != "gene-cell"))


def applies(x: torch.Tensor, z: torch.Tensor, likelihood: str, dispersion: str) -> bool:
    """Whether :func:`log_px_from_logits` computes log p(x | z) for latent samples ``z`` (else the plain path must).

    ``z`` may be bfloat16 (the decoder's matrix products under ``precision="bfloat16"``): the
    kernel then takes the decoder's outputs in float32.
    """
    return (available() and x.device.type == "cpu" and z.dim() == 2 and z.dtype in (torch.float32, torch.bfloat16)
            and x.dtype == torch.float32 and (likelihood == "poisson" or dispersion != "gene-cell"))


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 tensor (the decoder's outputs are bfloat16 under autocast)."""
    return t.float().contiguous()


def row_nonzeros(x: torch.Tensor, nz) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X's non-zeros as CSR arrays (indptr, columns, values), from the data layer's ``nz`` when it has them."""
    from .distributions import nonzeros

    rows, cols, vals = nonzeros(x) if nz is None else nz
    # the rows are sorted: each row's first entry by binary search (cheaper than bincount and cumsum)
    indptr = np.searchsorted(_np(rows), np.arange(x.shape[0] + 1))
    return indptr, _np(cols), _np(vals).astype(np.float32, copy=False)


def log_px_from_logits(likelihood: str, x: torch.Tensor, logits: torch.Tensor, zi_logits: torch.Tensor | None,
                       log_library: torch.Tensor, theta: torch.Tensor | None,
                       theta_index: torch.Tensor | None = None, nz=None) -> torch.Tensor | None:
    """Per-cell log p(x | z) with mu = softmax(``logits``) exp(``log_library``); None if the kernel failed.

    ``x``, ``logits``, ``zi_logits`` are (cells, genes); ``theta`` is (dispersions, genes) and
    ``theta_index`` (cells,) the row of ``theta`` each cell uses (None: row 0); ``theta`` and
    ``zi_logits`` are None where the likelihood has none; ``nz`` = (rows, columns, values) of
    x's non-zeros, row-sorted, if known. Check :func:`applies` first.
    """
    if theta_index is None:
        theta_index = torch.zeros(x.shape[0], dtype=torch.int64)
    try:
        return _FusedCounts.apply(MODES[likelihood], x.contiguous(), row_nonzeros(x, nz), _f32(logits),
                                  None if zi_logits is None else _f32(zi_logits), _f32(log_library),
                                  theta, theta_index.long())
    except Exception as err:  # noqa: BLE001 - a kernel that cannot compile here must not stop the analysis
        _state["failed"] = True
        _LOG.warning("the fused likelihood kernel is not available here (%s: %s); using the plain torch path "
                     "(same values)", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
