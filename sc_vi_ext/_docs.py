"""Shared parameter descriptions, formatted into the docstrings of ``tl`` and ``pl``."""

from __future__ import annotations

from textwrap import dedent

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
        "that are idle now (sampled for 0.2 s), since busy cores make torch's spin-waiting threads very slow. "
        "A seed reproduces a result "
        "bit for bit only with the same thread count: pass it for runs that must match (the count used is "
        "stored in ``params['n_threads_used']``)."
    ),
    "progress": "progress\n    Show a progress bar.",
    "batch_size": "batch_size\n    Cells per minibatch.",
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
        fields = {k: v.replace("\n", "\n    ") for k, v in {**_shared, **extra}.items()}
        func.__doc__ = func.__doc__.format(**fields)
        return func

    return deco
