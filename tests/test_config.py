from pathlib import Path

import pytest

from localearn.config import make_config
from localearn.errors import UserError


def test_toml_file_with_flag_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('rule = "dgl"\nepochs = 7\nlr = 0.2\n')
    cfg = make_config(f, lr=0.05, epochs=None)
    assert (cfg.rule, cfg.epochs, cfg.lr) == ("dgl", 7, 0.05)


def test_yaml_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("fit:\n  model: resnet110\n  k: 55\n  batch_size: 64\n")
    cfg = make_config(f)
    assert (cfg.model, cfg.k, cfg.batch_size) == ("resnet110", 55, 64)


@pytest.mark.parametrize("overrides,message", [
    ({"lr": -1.0}, r"invalid lr: Input should be greater than 0 \(got -1.0\)"),
    ({"dataset": "mnist"}, r"unknown dataset 'mnist'; registered datasets: .*digits"),
    ({"model": "vgg"}, r"unknown model 'vgg'"),
    ({"data_dir": Path("/no/such/dir")}, r"data directory '/no/such/dir' does not exist"),
    ({"epochs": 0}, r"invalid epochs"),
    ({"colour": "red"}, r"invalid colour: Extra inputs are not permitted"),
    ({"epochs": 2, "warmup_epochs": 3}, r"warmup_epochs \(3.0\) must be less than epochs"),
])
def test_invalid_values_are_one_clear_line(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        make_config(**overrides)
    assert "\n" not in str(info.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        make_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3")
    with pytest.raises(UserError, match="is not valid"):
        make_config(bad)
    ini = tmp_path / "run.ini"
    ini.write_text("x")
    with pytest.raises(UserError, match="valid: .toml, .yaml"):
        make_config(ini)
