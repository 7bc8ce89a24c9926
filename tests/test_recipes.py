"""Every recipe under recipes/ parses through the training CLI without running anything.

The CLI's parser resolves ``model.class_path`` (the LightningModule must exist and accept the
``init_args``), the data module's and trainer's arguments, loggers and callbacks — but no class
is instantiated, so the 7B recipes parse without downloading or loading weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


@pytest.fixture(scope="module")
def parse():
    from pytorch_lightning.cli import LightningCLI

    from tokensieve.train import cli as train_cli
    from tokensieve.train.datamodule import VideoDataModule
    from tokensieve.train.module import CompressorModule

    base = getattr(train_cli, "TokensieveCLI", LightningCLI)

    class ParseOnly(base):
        def instantiate_classes(self) -> None:  # parse and validate only: no backbone is loaded
            pass

    def run(path: Path):
        cli = ParseOnly(CompressorModule, VideoDataModule, subclass_mode_model=True, run=False, args=["--config", str(path)], save_config_callback=None, auto_configure_optimizers=False)
        return cli.config

    return run


def test_recipes_are_found():
    names = {str(p.relative_to(p.parents[1])) for p in RECIPES}
    assert {"tiny/qtsplus.yaml", "tiny/matryoshka.yaml", "tiny/flexselect_listmle.yaml", "qwen2_5_vl_7b/qtsplus.yaml", "qwen2_5_vl_7b/matryoshka.yaml"} <= names
    assert {"llava_onevision_7b/flexselect.yaml", "llava_onevision_7b/qtsplus.yaml", "llava_onevision_7b/matryoshka.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses_without_running(parse, path):
    config = parse(path)
    assert config.model.class_path
    if path.parent.name.endswith("_7b"):
        assert config.model.init_args.backbone_kwargs["dtype"] == "bfloat16"
        assert config.model.init_args.backbone_kwargs["attn_implementation"] == "sdpa"


def test_a_wrong_argument_is_caught(parse, tmp_path):
    recipe = (Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "qtsplus.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.replace("kl_weight: 1.0", "kl_wieght: 1.0"))
    with pytest.raises(SystemExit):
        parse(bad)
