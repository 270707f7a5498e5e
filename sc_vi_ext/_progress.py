"""Progress bars that behave in a terminal and in a notebook, with or without ipywidgets.

``tqdm.auto`` picks the widget bar in Jupyter and, without ipywidgets, warns "IProgress not
found" and falls back to text; we take the text bar ourselves in that case.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
