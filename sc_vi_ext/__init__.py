"""sc_vi_ext: amortized variational inference for single-cell counts, as a scanpy plugin."""

from importlib.metadata import PackageNotFoundError, version

from ._openmp import shorten_spin_wait

shorten_spin_wait()  # before torch is loaded: libgomp reads it then

from . import datasets, pl, tl  # noqa: E402
from .model_store import get_model  # noqa: E402

try:
    __version__ = version("sc_vi_ext")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"

__all__ = ["datasets", "get_model", "pl", "tl"]
