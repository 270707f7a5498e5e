"""The training step's ELBO and its gradient written out, without autograd.

A training step of the VAE is a few dozen small tensor operations around the matrix
products and the likelihood kernel. Under autograd each of them also records a node that the
backward pass then visits, casts included under bfloat16 autocast. Here the same step is one
forward pass that keeps what its backward needs, then the backward pass in closed form, every
gradient written straight into the parameters' ``.grad``; the ops themselves are the same
kind and number. Measured with the step benchmark (table b, the two alternating): 9-14 %
less time per step.

* Linear layers: a = h W^T + b; dW = g^T h, db = sum(g), dh = g W. Where the step's precision
  is bfloat16, the layers with at least ``MIN_BF16_WEIGHTS`` weights (the gene-sized ones)
  multiply in bfloat16 as autocast does, the smaller ones in float32: there a cast costs more
  than bfloat16 saves (one-off script: 1.07x per step, median of 6 alternating pairs; the same
  change under autocast, on the autograd step, had bought nothing, 0.99x). The bias gradient
  is summed in float32.
* BatchNorm (training mode) and ReLU: aten's own ``native_batch_norm`` forward and backward
  (the running statistics are updated as ``nn.BatchNorm1d`` does) and ``threshold_backward``.
* Dropout: the mask drawn as torch's CPU dropout draws it (``bernoulli_(1 - p) / (1 - p)``),
  so the random streams advance as on the plain path.
* log p(x | z) and its gradient in the logits, zero-inflation logits and dispersion: the
  fused kernel (:func:`~sc_vi_ext.module.fast_counts.kernel_terms`).
* z = mean + exp(log_var / 2) eps and KL(q || N(0, I)) = (exp(log_var) + mean^2 - 1 - log_var) / 2
  per latent dimension, log_var = log(exp(a) + 1e-4) of the encoder's output a.

It computes what :meth:`VAE.loss <sc_vi_ext.module.VAE.loss>` and ``backward`` of the
warm-up-weighted loss compute (value and gradient in every parameter, tested), for the
configurations in :func:`applies`; the training loop takes the plain path for the others.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fast_counts
from .nn import VAR_FLOOR
from .vae import VAE, LossOutput

MIN_BF16_WEIGHTS = 1 << 16  # smaller layers stay float32 (step benchmark, table a4)


def applies(module: VAE, device) -> bool:
    """Whether :func:`elbo_and_grad` computes the training steps of ``module`` on ``device`` now.

    An observed library and a normal latent (the defaults), a likelihood the fused kernel
    takes (not a per-cell dispersion) and that runs here (:func:`~sc_vi_ext.module.fast_counts.ready`),
    CPU, the module and every BatchNorm in training mode, and no parameter with a gradient hook
    (the hooks would not run).
    """
    return (module.library == "observed" and module.latent_distribution == "normal"
            and fast_counts.applies_to(module, device) and module.training
            and all(m.training for m in module.modules() if isinstance(m, nn.BatchNorm1d))
            and not any(getattr(p, "_backward_hooks", None) for p in module.parameters())
            and fast_counts.ready())


class _Products:
    """The step's matrix products at one precision, each weight cast once per step."""

    def __init__(self, bf16: bool):  # noqa: FBT001
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.grads: dict[nn.Parameter, torch.Tensor] = {}  # the step's gradient, by parameter

    def set_grad(self, p: nn.Parameter, g: torch.Tensor) -> None:
        if p.requires_grad:
            self.grads[p] = g

    def dtype_of(self, linear: nn.Linear) -> torch.dtype:
        """bfloat16 for a layer with at least ``MIN_BF16_WEIGHTS`` weights when the step's precision is bfloat16."""
        return self.dtype if linear.weight.numel() >= MIN_BF16_WEIGHTS else torch.float32

    def forward(self, h: torch.Tensor, linear: nn.Linear):
        """Return h W^T + b in float32 and the cast input and weight for the backward pass."""
        dt = self.dtype_of(linear)
        h_c, w_c = h.to(dt), linear.weight.to(dt)
        return torch.addmm(linear.bias.to(dt), h_c, w_c.t()).float(), h_c, w_c

    def backward(self, g: torch.Tensor, h_c: torch.Tensor, w_c: torch.Tensor, linear: nn.Linear, *, input_grad: bool):
        """Write the weight and bias gradients of ``linear``; return the input gradient (float32) or None."""
        g_c = g.to(w_c.dtype)
        self.set_grad(linear.weight, (g_c.t() @ h_c).float())
        self.set_grad(linear.bias, g.sum(0))
        return (g_c @ w_c).float() if input_grad else None


def _stack_forward(stack, x: torch.Tensor, cat: torch.Tensor | None, mm: _Products) -> tuple[torch.Tensor, list]:
    """Linear -> BatchNorm -> ReLU -> Dropout blocks of an ``FCLayers``; return the output and what backward needs."""
    saved = []
    for linear, bn, drop in stack.layers:
        h = torch.cat([x, cat], -1) if cat is not None else x
        a, h_c, w_c = mm.forward(h, linear)
        y, b_mean, b_invstd = torch.native_batch_norm(a, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                      True, bn.momentum, bn.eps)
        bn.num_batches_tracked.add_(1)
        r = torch.relu_(y)
        noise = None
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            noise = torch.empty_like(r).bernoulli_(1 - drop.p).div_(1 - drop.p)
            x = r * noise
        else:
            x = r
        saved.append((h_c, w_c, a, b_mean, b_invstd, r, noise))
    return x, saved


def _stack_backward(stack, g: torch.Tensor, saved: list, mm: _Products, *, input_grad: bool) -> torch.Tensor | None:
    """Backward of :func:`_stack_forward` from the output gradient ``g``; return the gradient in its input ``x``."""
    n_cat = stack.n_cat
    for i in range(len(saved) - 1, -1, -1):
        linear, bn, _ = stack.layers[i]
        h_c, w_c, a, b_mean, b_invstd, r, noise = saved[i]
        if noise is not None:
            g = g * noise
        g = torch.ops.aten.threshold_backward(g, r, 0)
        g, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            g, a, bn.weight, bn.running_mean, bn.running_var, b_mean, b_invstd, True, bn.eps,
            [True, bn.weight.requires_grad, bn.bias.requires_grad])
        mm.set_grad(bn.weight, g_w)
        mm.set_grad(bn.bias, g_b)
        g = mm.backward(g, h_c, w_c, linear, input_grad=i > 0 or input_grad)
        if g is not None and n_cat:
            g = g[:, : g.shape[1] - n_cat]
    return g


def elbo_and_grad(module: VAE, x: torch.Tensor, batch: torch.Tensor | None, log_library: torch.Tensor, *,
                  cov: torch.Tensor | None = None, nz=None, kl_weight: float = 1.0, bf16: bool = False,
                  generator: torch.Generator | None = None) -> LossOutput:
    """One training step's per-cell ELBO terms, with the gradient of ``LossOutput.loss(kl_weight)`` in ``.grad``.

    Every parameter of ``module`` that requires a gradient gets it in ``.grad`` (replaced,
    not accumulated); BatchNorm's running statistics are updated. ``bf16``: the gene-sized
    matrix products in bfloat16 (see the module text). Check :func:`applies` first. The returned terms
    carry no graph.
    """
    mm = _Products(bf16)
    with torch.no_grad():
        out = _step(module, x, batch, log_library, cov, nz, kl_weight, mm, generator)
    for p, g in mm.grads.items():
        p.grad = g
    return out


def _step(module, x, batch, log_library, cov, nz, kl_weight, mm, generator):
    enc, dec = module.encoder, module.decoder
    cat = module.covariates(batch, cov)
    n = x.shape[0]
    # encoder: q(z | x)
    h, enc_saved = _stack_forward(enc.net, torch.log1p(x), cat if module.encode_covariates else None, mm)
    mean, hm_c, wm_c = mm.forward(h, enc.mean)
    raw, hv_c, wv_c = mm.forward(h, enc.log_var)
    e = torch.exp(raw)
    var = e + VAR_FLOOR
    log_var = torch.log(var)
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    std = torch.exp(0.5 * log_var)
    z = torch.addcmul(mean, std, eps)
    var_q = torch.exp(log_var)
    kl = 0.5 * (var_q + mean * mean - 1.0 - log_var).sum(-1)
    # decoder and likelihood
    hd, dec_saved = _stack_forward(dec.net, z, cat, mm)
    logits, hs_c, ws_c = mm.forward(hd, dec.scale)
    zi = None
    if module.likelihood == "zinb":
        zi, hz_c, wz_c = mm.forward(hd, dec.zi_logits)
    theta, index = module.gene_dispersion(batch)
    index = torch.zeros(n, dtype=torch.int64) if index is None else index.long()
    rec, g_logits, g_zi, _, g_theta = fast_counts.kernel_terms(
        fast_counts.MODES[module.likelihood], x.contiguous(), fast_counts.row_nonzeros(x, nz), logits, zi,
        log_library.float().contiguous(), theta, index, grad=True)
    # backward of loss = mean(-rec + w kl)
    scale = -1.0 / n
    if theta is not None:  # d/d log theta = theta d/d theta
        g = fast_counts.theta_gradient(g_theta, torch.full((n,), scale), index, theta.shape[0])
        mm.set_grad(module.log_theta, g.mul_(theta))
    g_hd = mm.backward(g_logits.mul_(scale), hs_c, ws_c, dec.scale, input_grad=True)
    if zi is not None:
        g_hd += mm.backward(g_zi.mul_(scale), hz_c, wz_c, dec.zi_logits, input_grad=True)
    g_z = _stack_backward(dec.net, g_hd, dec_saved, mm, input_grad=True)
    w = kl_weight / n
    g_mean = g_z + w * mean
    # d/d log_var: of z, g_z eps std / 2; of the KL, w (exp(log_var) - 1) / 2; then through log(exp(raw) + floor)
    g_raw = (g_z * eps * std + w * (var_q - 1.0)).mul_(0.5).mul_(e / var)
    g_h = mm.backward(g_mean, hm_c, wm_c, enc.mean, input_grad=True)
    g_h += mm.backward(g_raw, hv_c, wv_c, enc.log_var, input_grad=True)
    _stack_backward(enc.net, g_h, enc_saved, mm, input_grad=False)
    return LossOutput(reconstruction=rec, kl=kl)
