"""The paper presets in examples/configs load, validate and hold the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from localearn import expr
from localearn.config import make_config

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
UNITS = {"resnet32": 16, "resnet110": 55, "resnet34": 17, "resnet101": 34, "resnet152": 51}
# dataset -> (batch size, lr) from the paper's section IV-B
TABLE1 = {"cifar10": (1024, 0.8), "svhn": (1024, 0.8), "stl10": (128, 0.1)}
METHODS = {"bp": "bp", "dgl": "dgl", "dgl-mlaan": "mlaan(dgl)", "infopro": "infopro",
           "infopro-mlaan": "mlaan(infopro)"}


def presets(table: str) -> list[Path]:
    return sorted((CONFIGS / table).rglob("*.toml"))


def test_every_row_has_a_preset():
    names = {p.relative_to(CONFIGS / "table1").as_posix() for p in presets("table1")}
    assert names == {f"{d}/{m}-{model}.toml" for d in TABLE1 for m in METHODS
                     for model in ("resnet32", "resnet110")}
    names = {p.name for p in presets("table2")}
    assert names == {f"{model}-{m}.toml" for model in ("resnet34", "resnet101", "resnet152")
                     for m in ("bp", "mlaan")}


@pytest.mark.parametrize("path", presets("table1"), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_table1_presets(path):
    cfg = make_config(path)
    method, model = path.stem.rsplit("-", 1)
    assert (cfg.model, cfg.rule) == (model, METHODS[method])
    assert cfg.k == (None if method == "bp" else UNITS[model])
    dataset = path.parent.name
    assert cfg.dataset == dataset and (cfg.batch_size, cfg.lr) == TABLE1[dataset]
    assert (cfg.epochs, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (400, 0.9, True, 1e-4)
    assert (cfg.warmup_epochs, cfg.warmup_lr) == (10, 0.01)
    rule = expr.build(cfg.rule)  # every rule the presets name is registered and valid
    assert rule.num_modules(cfg.k, UNITS[model]) == (1 if method == "bp" else UNITS[model])


@pytest.mark.parametrize("path", presets("table2"), ids=lambda p: p.stem)
def test_table2_presets(path):
    cfg = make_config(path)
    model, method = path.stem.split("-")
    assert cfg.model == model and cfg.dataset == "imagenet-shards"
    assert cfg.k == (None if method == "bp" else UNITS[model])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_epochs) == (150, 128, 0.05, 0)
    expr.build(cfg.rule)


def test_flags_override_a_preset(tmp_path):
    cfg = make_config(CONFIGS / "table1" / "cifar10" / "dgl-resnet32.toml", k=8, epochs=20,
                      dataset="cifar10-shards")
    assert (cfg.k, cfg.epochs, cfg.dataset, cfg.lr) == (8, 20, "cifar10-shards", 0.8)
