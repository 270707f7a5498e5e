"""Shared parameter descriptions, formatted into the docstrings of ``tl`` and ``pl``."""

from __future__ import annotations

from textwrap import dedent

from .diagnostics import optimize as _opt

_shared = {
    "adata": "adata\n    Annotated data matrix (cells x genes).",
    "key": "key\n    The ``key_added`` of the trained model (:func:`sc_vi_ext.tl.vae`).",
    "copy": "copy\n    Return a modified copy instead of writing to ``adata``.",
    "random_state": (
        "random_state\n    Seed for every random draw; the same seed gives bit-identical results on the same machine "
        "with the same torch version and number of torch threads (see README, Reproducibility)."
    ),
    "device": 'device\n    Torch device; ``"auto"`` picks CUDA when available, else CPU.',
    "n_threads": (
        "n_threads\n    CPU threads for torch during this call. None: torch's default, reduced to the cores "
        "that are idle now and re-chosen about once a second from what other processes use while the call "
        "runs, since busy cores make torch's spin-waiting threads very slow. A seed reproduces a result "
        "bit for bit only with the same thread count: pass it for runs that must match (the count the call "
        "started with is stored in ``params['n_threads_used']``)."
    ),
    "progress": "progress\n    Show a progress bar.",
    "batch_size": "batch_size\n    Cells per minibatch.",
    # the last parameters of every tool that applies a stored model
    "apply_model": "\n".join(("{batch_size}", "{random_state}", "{device}", "{progress}", "{copy}")),
    "plot_common": dedent("""\
        ax
            Matplotlib axes to draw into; a new figure is made when None.
        show
            Show the figure; by default, unless ``ax`` is given or ``return_fig`` is set.
        return_fig
            Return the Figure instead of the Axes."""),
}


def doc_params(**extra: str):
    """Format ``{adata}``-style fields of a docstring with the shared text above."""

    def deco(func):
        shared = {**_shared, **extra}
        shared["apply_model"] = shared["apply_model"].format(**shared)
        fields = {k: v.replace("\n", "\n    ") for k, v in shared.items()}
        func.__doc__ = func.__doc__.format(**fields)
        return func

    return deco


# the per-cell optimiser of q* (tl.amortization_gap, tl.refine); its defaults are optimize_q's
OPTIMISER_DOC = f"""\
method
    Per-cell optimiser of q*: ``"lbfgs"`` (sample-average approximation: each cell's
    noise fixed, L-BFGS with a line search; converges in 5-10 evaluations) or ``"adam"``
    (the earlier stochastic optimiser, about 4x slower; kept for comparison).
max_steps
    Cap on objective evaluations (decoder passes with gradient) per cell; None:
    {_opt.MAX_STEPS["lbfgs"]} for ``"lbfgs"``, {_opt.MAX_STEPS["adam"]} for ``"adam"``.
lr
    Adam learning rate (``"adam"`` only).
n_samples_step
    Draws per evaluation of a cell's ELBO; None: 2 x latent dimension (at least
    {_opt.LBFGS_MIN_DRAWS}) for ``"lbfgs"``, {_opt.ADAM_DRAWS} for ``"adam"``.
window
    Steps per window, over which ``"adam"`` averages a cell's ELBO estimates.
patience
    A cell stops after this many steps (``"lbfgs"``; None: {_opt.PATIENCE["lbfgs"]}) or windows
    (``"adam"``; None: {_opt.PATIENCE["adam"]}) that gain less than ``tol``.
tol
    Improvement (nats) that counts."""
