"""``sc-vi-ext``: the help explains every argument, and ``train`` passes its options through."""

from __future__ import annotations

import argparse

import anndata as ad
import pytest
import torch

import sc_vi_ext as sv
from sc_vi_ext import cli


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["demo", "train"])
def test_every_argument_has_help_with_default(command, capsys):
    p = _commands()[command]
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.dest
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    n_options = sum(1 for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction))
    assert text.count("(default:") == n_options
    assert "auto: min(400, max(20, round(2e6 / n_cells)))" in text and "(default: auto)" in text
    assert "``" not in text


def test_description_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    assert "\n  sc-vi-ext demo " in out and "\n  sc-vi-ext train IN OUT " in out  # line breaks kept


def test_train_passes_options_and_threads(sim, tmp_path, monkeypatch):
    sim.write_h5ad(tmp_path / "in.h5ad")
    seen = {}
    before = torch.get_num_threads()

    def fake_vae(adata, **kwargs):
        seen.update(kwargs, threads=torch.get_num_threads())

    monkeypatch.setattr(sv.tl, "vae", fake_vae)
    cli.main(["train", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--batch-key", "batch",
              "--layer", "counts", "--likelihood", "nb", "--max-epochs", "7", "--no-early-stopping",
              "--early-stopping-patience", "5", "--n-threads", "2", "--device", "cpu", "--lr", "0.01", "--quiet"])
    assert torch.get_num_threads() == before
    expected = {"batch_key": "batch", "layer": "counts", "likelihood": "nb", "max_epochs": 7,
                "early_stopping": False, "early_stopping_patience": 5, "device": "cpu", "lr": 0.01,
                "progress": False, "n_threads": 2, "compile": "auto"}
    assert {k: seen[k] for k in expected} == expected
    cli.main(["train", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--quiet"])
    assert seen["max_epochs"] is None and seen["early_stopping"] is True  # "auto": the rule of tl.vae


def test_train_end_to_end_replaces_old_results(trained, tmp_path):
    trained.obs["vae_log_px"] = 1.0  # a result of the old model
    trained.write_h5ad(tmp_path / "in.h5ad")
    cli.main(["train", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--max-epochs", "2",
              "--n-threads", "1", "--quiet"])
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_vae"].shape == (trained.n_obs, 10)
    assert "vae_log_px" not in out.obs
    assert len(out.uns["vae"]["history"]["epoch"]) == 2
