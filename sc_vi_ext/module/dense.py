"""The NB / ZINB terms that touch every (cell, gene) entry, with their gradient written out.

The eager path of :func:`sc_vi_ext.module.fused.dense_terms`: the same value as the plain
formulas there (``dense_nb``, ``dense_zinb``, which stay the reference and what
``torch.compile`` fuses), in fewer passes over memory and with far fewer in the backward
pass, which autograd would otherwise build from ~30 element-wise nodes (``logaddexp``'s
backward alone was 38 % of a q* step when measured).

Per entry, with u = mu / theta, s = log(1 + u) = log(theta + mu) - log(theta), the NB zero
mass nb0 = -theta s and a = 1[x = 0] sigmoid(logit + theta s) (the share of a zero that the
dropout component explains):

    value  = x (log mu - log theta - s) + nb0 + 1[x = 0] softplus(logit - nb0) - softplus(logit)
    d/d mu = -(x + theta) (1 - a) / (theta + mu)        d/d log mu = x
    d/d logit = a - sigmoid(logit)
    d/d theta = (1 - a) (mu / (theta + mu) - s) - x / (theta + mu)

(for the plain NB, a = 0 and the logit terms drop). x = 0 entries contribute x log mu = 0,
so no ``where`` over the block is needed. The gradient is computed in the forward pass,
where its intermediates are at hand, and only when an input requires it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _NBDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mu, log_mu, theta, zi_logits):
        zero = (x == 0).to(mu.dtype)  # (cells, genes): the same for every sample
        u = mu / theta
        s = torch.log1p(u)
        # sum over genes of x log(theta): (cells,) when theta is per gene or per cell and gene
        x_log_theta = (x * torch.log(theta)).sum(-1)
        out = (x * (log_mu - s)).sum(-1) - (s * theta).sum(-1) - x_log_theta
        v = None
        if zi_logits is not None:
            v = zi_logits + s * theta  # logit - nb0
            out = out + (F.softplus(v) * zero).sum(-1) - F.softplus(zi_logits).sum(-1)
        need = ctx.needs_input_grad
        if not any(need[1:]):
            return out
        inv = torch.reciprocal(mu + theta)
        keep = None if v is None else 1 - torch.sigmoid(v).mul_(zero)  # 1 - a
        g_mu = g_theta = g_logit = None
        if need[1]:
            g_mu = -(x + theta) * inv
            if keep is not None:
                g_mu.mul_(keep)
        if need[3]:
            g_theta = u.div_(u + 1).sub_(s)  # mu / (theta + mu) - s
            if keep is not None:
                g_theta.mul_(keep)
            g_theta.sub_(x * inv)
        if need[4]:
            g_logit = (1 - keep).sub_(torch.sigmoid(zi_logits))
        ctx.save_for_backward(x, g_mu, g_theta, g_logit)
        ctx.theta_shape = theta.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, g_mu, g_theta, g_logit = ctx.saved_tensors
        need = ctx.needs_input_grad
        go = grad_out[..., None]
        grads = [None] * 5
        if need[1]:
            grads[1] = g_mu * go
        if need[2]:
            grads[2] = x * go
        if need[3]:
            grads[3] = (g_theta * go).sum_to_size(ctx.theta_shape)
        if need[4]:
            grads[4] = g_logit * go
        return tuple(grads)


def nb_dense(x: torch.Tensor, mu: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor,
             zi_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cell sum of the NB (``zi_logits=None``) or ZINB terms that need no gamma function.

    ``x`` is (cells, genes); ``mu``, ``log_mu`` (= log mu) and ``zi_logits`` are (..., cells, genes);
    ``theta`` broadcasts against them. Returns (..., cells). Equals
    :func:`~sc_vi_ext.module.fused.dense_nb` / :func:`~sc_vi_ext.module.fused.dense_zinb`,
    value and gradient in every input (tested).
    """
    return _NBDense.apply(x, mu, log_mu, theta, zi_logits)


class _NBFromLogits(torch.autograd.Function):
    """The dense NB / ZINB terms from the decoder's logits: softmax, library and likelihood in one.

    mu = softmax(logits) exp(log_library); log mu = logits - lse + log_library, with
    lse = max(logits) - log(max(softmax)) (exact, and no second exponential pass). The
    gradient in the logits is G - softmax sum(G), with G = x - (x + theta)(1 - a) mu / (theta + mu)
    the gradient in log mu; sum(G) is the gradient in the log library.
    """

    @staticmethod
    def forward(ctx, x, logits, log_library, theta, zi_logits):
        zero = (x == 0).to(logits.dtype)
        p = torch.softmax(logits, -1)
        lse = logits.amax(-1) - torch.log(p.amax(-1))
        mu = p * torch.exp(log_library)[..., None]
        u = mu / theta
        s = torch.log1p(u)
        st = s * theta  # -(log NB(0))
        x_total = x.sum(-1)
        out = ((x * (logits - s)).sum(-1) - (lse - log_library) * x_total - st.sum(-1)
               - (x * torch.log(theta)).sum(-1))
        v = None
        if zi_logits is not None:
            v = zi_logits + st
            out = out + (F.softplus(v) * zero).sum(-1) - F.softplus(zi_logits).sum(-1)
        need = ctx.needs_input_grad
        if need[3]:
            raise NotImplementedError("nb_from_logits has no gradient in theta; use nb_dense")
        if not (need[1] or need[2] or need[4]):
            return out
        a = None if v is None else torch.sigmoid(v).mul_(zero)  # share of a zero the dropout explains
        r = u.div_(u + 1)  # mu / (theta + mu)
        w = r.mul_(x + theta)
        if a is not None:
            w.mul_(1 - a)
        g_log_mu = torch.sub(x, w, out=w)  # G
        g_lib = g_log_mu.sum(-1)
        g_logits = g_log_mu.sub_(p.mul_(g_lib[..., None]))
        g_zi = None if zi_logits is None else a.sub_(torch.sigmoid(zi_logits))
        ctx.save_for_backward(g_logits, g_lib, g_zi)
        ctx.lib_shape = log_library.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        g_logits, g_lib, g_zi = ctx.saved_tensors
        need = ctx.needs_input_grad
        go = grad_out[..., None]
        return (None, g_logits * go if need[1] else None,
                (g_lib * grad_out).sum_to_size(ctx.lib_shape) if need[2] else None, None,
                g_zi * go if need[4] else None)


def nb_from_logits(x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, theta: torch.Tensor,
                   zi_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Return the dense terms of :func:`nb_dense` with mu = softmax(``logits``) exp(``log_library``).

    ``logits`` (..., cells, genes) are the decoder's gene logits before the softmax;
    ``log_library`` is (cells,) or (..., cells). The same value as softmax, library and
    :func:`nb_dense` in turn, in about half the passes over memory, and the gradient in
    ``logits``, ``log_library`` and ``zi_logits`` written out; ``theta`` must not require a
    gradient (the inference paths, where the weights are frozen).
    """
    return _NBFromLogits.apply(x, logits, log_library, theta, zi_logits)
