"""Make ``docs/img/gap_history.png`` and the trust numbers of ``docs/gap.md`` (the overfitted model).

    python docs/overfit_figure.py

The model is the overfitting fixture of ``tests/test_trust.py``: 120 training cells, 200 epochs
without early stopping or dropout, gaps recorded every 50 epochs. The PBMC figures of the docs
are the demo's (``sc-vi-ext demo``: ``amortization_gap.png``, ``latent_trust.png`` as
``trust_umap.png``).
"""

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import sc_vi_ext as sv  # noqa: E402

adata = sv.datasets.simulate(240, 200, n_batches=1, n_types=3, random_state=5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sv.tl.vae(adata, train_size=0.5, max_epochs=200, batch_size=16, lr=1e-3, dropout=0.0, early_stopping=False,
              n_hidden=128, gap_every=50, progress=False)
print(*[str(w.message) for w in caught if "overfits" in str(w.message)], sep="\n")
fig = sv.pl.gap_history(adata, return_fig=True)
fig.savefig(Path(__file__).parent / "img" / "gap_history.png", dpi=110, bbox_inches="tight")
sv.tl.trust_score(adata, progress=False)
for split, r in adata.uns["vae"]["trust"].items():
    if split != "params":
        print(f"{split}: {100 * r['frac_untrusted']:.0f}% flagged, median trust {r['trust_median']:.2f}")
