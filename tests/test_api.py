"""The face: lazy public API, CLI verbs, and (opt-in) the whole quickstart."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tokensieve
from tokensieve.cli import main


def test_import_data_does_not_pull_lightning_or_transformers():
    code = "import sys, tokensieve.data; print(any(m.startswith(('pytorch_lightning', 'transformers')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "False"


def test_public_api_is_lazy_and_complete():
    assert set(tokensieve.__all__) >= {"list_compressors", "get_compressor", "load_compressor", "load_backbone", "apply"}
    assert "flexselect" in tokensieve.list_compressors() and "divprune" in tokensieve.list_compressors()
    with pytest.raises(KeyError, match="registered:"):
        tokensieve.get_compressor("no-such-method")
    with pytest.raises(AttributeError):
        tokensieve.no_such_attribute  # noqa: B018


def test_cli_list_and_make_tiny_backbone(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "uniform" in capsys.readouterr().out.split()
    assert main(["make-tiny-backbone", str(tmp_path / "bb")]) == 0
    config = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and (tmp_path / "bb" / "model.safetensors").is_file()


def test_export_of_a_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        main(["export", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")])


def test_load_compressor_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tokensieve.load_compressor(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"method": "uniform"}))
    with pytest.raises(TypeError, match="training-free"):
        tokensieve.load_compressor(tmp_path)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, monkeypatch):
    from tokensieve.quickstart import run_quickstart

    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = run_quickstart(tmp_path / "qs", max_epochs=2)
    assert summary["spearman_after"] > summary["spearman_before"]
    methods = {r["method"] for r in summary["fidelity"]}
    assert {"flexselect", "uniform", "random"} <= methods
    assert {r["budget"] for r in summary["fidelity"]} == {0.1, 0.25, 0.5}
    assert json.loads((tmp_path / "qs" / "quickstart.json").read_text())["spearman_after"] == summary["spearman_after"]
