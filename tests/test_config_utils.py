"""Config files and overrides (`skipdit_jax.config_utils`): the one loader the CLI's demo,
the experiments and users' scripts share."""

from __future__ import annotations

from pathlib import Path

import pytest

from skipdit_jax.config_utils import apply_overrides, load_config_file, parse_overrides, split_config_arg
from skipdit_jax.errors import ConfigError, UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_variant_argument_after_a_colon():
    assert split_config_arg("configs/a.py:dit") == ("configs/a.py", "dit")
    assert split_config_arg("configs/a.py") == ("configs/a.py", None)
    assert split_config_arg("C:/x/a.py") == ("C:/x/a.py", None)  # a drive letter is not a variant
    skip = load_config_file(CONFIGS / "mnist_skipdit.py")
    dit = load_config_file(f"{CONFIGS / 'mnist_skipdit.py'}:dit")
    assert skip.model.long_skip and not dit.model.long_skip
    assert load_config_file(CONFIGS / "mnist_dit.py").model.to_dict() == dit.model.to_dict()
    stage2 = load_config_file(CONFIGS / "finetune_dit_to_skipdit.py", "stage2")
    assert stage2.train.trainable == "all"


def test_same_stem_in_two_folders_does_not_collide(tmp_path):
    for name, steps in (("a", 3), ("b", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cfg.py").write_text(
            f"import ml_collections\ndef get_config(arg=None):\n    return ml_collections.ConfigDict(dict(steps={steps}))\n"
        )
    assert load_config_file(tmp_path / "a" / "cfg.py").steps == 3
    assert load_config_file(tmp_path / "b" / "cfg.py").steps == 5


def test_bad_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config_file(tmp_path / "missing.py")
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    with pytest.raises(UserError, match="cannot load config file"):
        load_config_file(tmp_path / "broken.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(UserError, match="no get_config"):
        load_config_file(tmp_path / "empty.py")
    with pytest.raises(UserError, match="stage3"):
        load_config_file(CONFIGS / "finetune_dit_to_skipdit.py:stage3")


def test_overrides_set_known_keys_and_refuse_unknown_ones():
    config = load_config_file(CONFIGS / "mnist_skipdit.py")
    assert config.is_locked
    apply_overrides(config, parse_overrides("train.steps=7,model.long_skip=false,data.name=folder"))
    assert (config.train.steps, config.model.long_skip, config.data.name) == (7, False, "folder")
    with pytest.raises(ConfigError, match="train.stpes"):
        apply_overrides(config, {"train.stpes": 1})
    with pytest.raises(ConfigError, match="nosuch"):
        apply_overrides(config, {"nosuch.steps": 1})
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(config, {"train.steps": "many"})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides("train.steps")
