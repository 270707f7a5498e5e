"""sc_vi_ext: amortized variational inference for single-cell counts, as a scanpy plugin."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, pl, tl
from .model_store import get_model

try:
    __version__ = version("sc_vi_ext")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"

__all__ = ["datasets", "get_model", "pl", "tl"]
