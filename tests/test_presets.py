"""The paper presets in examples/configs: one per table row, each a valid config whose rule
builds on its model and K, with the paper's settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from localearn import expr
from localearn.build import build_network
from localearn.config import make_config
from localearn.interfaces import DataInfo
from localearn.measure import RunSpec

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
UNITS = {"resnet32": 16, "resnet110": 55, "resnet34": 17, "resnet101": 34, "resnet152": 51,
         "resnet34-zero-init": 17}
# dataset -> (batch size, lr, image size) from the paper's section IV-B
TABLE1 = {"cifar10": (1024, 0.8, 32), "svhn": (1024, 0.8, 32), "stl10": (128, 0.1, 96)}
# the rules of the public code's files (docs/presets.md): resnetDGL.py (InfoPro's 1c2f CE
# classifier, no decoder), resnetDGLbin (its fixed-width DGL head everywhere), resnetInfoProbin
# (stage-index ramp), resnetMLAAN (linear heads, k=2), resnetDGL_DFLocalPlus (MLM only, InfoPro
# classifiers, wx=0.01, wy=0.99), resnetDGL_EMAPlus (LAM only, DGL head at weight 1)
# The public CIFAR MLAAN files update only the last module's EMA twin, before the optimizer
# step (twins=public_last); the LAM-only and ImageNet files every twin, before it (public_all).
GREEDY = "infopro(loss=ce, ixx_1=0, ixx_2=0, ixy_1=1, ixy_2=1)"
DGL_STAR = "mlaan(dgl(style=public), leaps=public, twins=public_last)"
METHODS = {
    "bp": "bp", "dgl": GREEDY, "dgl-mlaan": DGL_STAR, "infopro": "infopro",
    "infopro-mlaan": "mlaan(infopro(loss=ce, ixx_1=5, ixx_2=0, ixy_1=0.5, ixy_2=0, "
                     "ramp=stage), leaps=public, twins=public_last)",
    "mlaan": "mlaan(linear, k=2, leaps=public, twins=public_last)",
}
TABLE4 = {"dgl": GREEDY, "mlm-dgl": f"mlm({GREEDY}, wx=0.01, wy=0.99)",
          "lam-dgl": "lam(dgl(style=public), wx=0, wy=1, leaps=public, twins=public_all)",
          "mlaan-dgl": DGL_STAR}
IMAGENET_MLAAN = "mlaan(linear, twins=public_all)"
# the public ImageNet code zero-initialises ResNet-34's residual BN; ResNet-101's it does not
IMAGENET_MODEL = {"resnet34": "resnet34-zero-init", "resnet101": "resnet101",
                  "resnet152": "resnet152"}
ALL = sorted(CONFIGS.rglob("*.toml"))
# building the auxiliary networks of MLAAN on ResNet-101/152 takes gigabytes (deep copies of
# bottleneck blocks in every LAM): for those the network and the rule are built, not the aux
HEAVY = {"resnet101", "resnet152"}


def presets(table: str) -> list[Path]:
    return sorted((CONFIGS / table).rglob("*.toml"))


def name(path: Path) -> str:
    return path.relative_to(CONFIGS).as_posix()


def test_every_row_has_a_preset():
    assert {name(p) for p in presets("table1")} == {
        f"table1/{d}/{m}-{model}.toml" for d in TABLE1 for m in METHODS
        for model in ("resnet32", "resnet110")}
    assert {p.name for p in presets("table2")} == {
        f"{model}-{m}.toml" for model in ("resnet34", "resnet101", "resnet152")
        for m in ("bp", "mlaan")}
    assert {p.name for p in presets("table3")} == {
        f"{data}-{model}-{m}.toml" for data, model in [
            ("cifar10", "resnet32"), ("cifar10", "resnet110"), ("imagenet", "resnet34"),
            ("imagenet", "resnet101"), ("imagenet", "resnet152")] for m in ("bp", "mlaan")}
    assert {p.stem for p in presets("table4")} == set(TABLE4)


def spec(path: Path) -> tuple[str, str, int | None, str, DataInfo]:
    """(rule, model, K, split, DataInfo) of a preset, validated as the command that reads it
    would validate it: `localearn memory` settings for Table III, `fit` configs otherwise."""
    data = tomllib.loads(path.read_text())
    if "memory" in data:
        run = RunSpec.model_validate(data["memory"])
        return run.rule, run.model, run.k, run.split, run.info
    cfg = make_config(path)
    size = {"imagenet-shards": 224, "stl10": 96}.get(cfg.dataset, 32)
    classes = 1000 if cfg.dataset == "imagenet-shards" else 10
    half = (0.5,) * 3
    return cfg.rule, cfg.model, cfg.k, cfg.split, DataInfo(classes, (3, size, size), half, half)


@pytest.mark.parametrize("path", ALL, ids=name)
def test_every_preset_is_valid_and_its_rule_builds(path):
    rule_text, model, k, split, info = spec(path)
    if path.parent != CONFIGS:  # a paper preset: which cell, and what is inferred
        header = path.read_text().splitlines()[:2]
        assert header[0].startswith("# Paper Table") and "Reproduces" in header[1]
        assert "Inferred" in path.read_text()
    torch.manual_seed(0)
    rule = expr.build(rule_text)
    net = build_network(model, k, rule, info.num_classes, info.input_shape, split)
    assert net.k == (1 if rule_text == "bp" else UNITS.get(model, k))
    if model not in HEAVY:
        aux = rule.setup(net, info)
        if rule_text.startswith(("mlaan", "lam")):
            assert len(aux["copies"]) > 0 and len(aux["twins"]) > 0


@pytest.mark.parametrize("path", presets("table1"), ids=name)
def test_table1_presets(path):
    cfg = make_config(path)
    method, model = path.stem.rsplit("-", 1)
    assert (cfg.model, cfg.rule) == (model, METHODS[method])
    assert cfg.k == (None if method == "bp" else UNITS[model])
    assert cfg.split == ("public" if model == "resnet110" and method != "bp" else "even")
    dataset = path.parent.name
    assert cfg.dataset == dataset and (cfg.batch_size, cfg.lr) == TABLE1[dataset][:2]
    assert (cfg.epochs, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (400, 0.9, True, 1e-4)
    # the public CIFAR trainer: its per-epoch --cos_lr, the last partial batch kept
    assert (cfg.schedule, cfg.drop_last) == ("public_cifar", False)
    assert cfg.warmup_epochs is None  # not set: the public schedule has its own warm-up
    assert "the paper states no augmentation" in path.read_text()


@pytest.mark.parametrize("path", presets("table2"), ids=lambda p: p.stem)
def test_table2_presets(path):
    cfg = make_config(path)
    model, method = path.stem.split("-")
    assert cfg.model == IMAGENET_MODEL[model] and cfg.dataset == "imagenet-shards"
    assert cfg.rule == ("bp" if method == "bp" else IMAGENET_MLAAN)
    assert cfg.k == (None if method == "bp" else UNITS[model])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule) == \
        (150, 128, 0.05, "public_imagenet")
    assert f'model = "{cfg.model}"' in path.read_text() and "# Init" in path.read_text()


@pytest.mark.parametrize("path", presets("table3"), ids=lambda p: p.stem)
def test_table3_presets(path):
    run = RunSpec.model_validate(tomllib.loads(path.read_text())["memory"])
    data, model, method = path.stem.split("-")
    cifar = data == "cifar10"
    assert run.model == (model if cifar else IMAGENET_MODEL[model])
    assert run.k == (None if method == "bp" else UNITS[model])
    assert (run.batch_size, run.input_size, run.num_classes, run.precision) == \
        ((1024, 32, 10, "32") if cifar else (128, 224, 1000, "32"))
    want = "bp" if method == "bp" else (DGL_STAR if cifar else IMAGENET_MLAAN)
    assert run.rule == want


@pytest.mark.parametrize("path", presets("table4"), ids=lambda p: p.stem)
def test_table4_presets(path):
    cfg = make_config(path)
    assert (cfg.rule, cfg.model, cfg.k, cfg.dataset) == \
        (TABLE4[path.stem], "resnet32", 16, "cifar10")
    same = make_config(CONFIGS / "table1" / "cifar10" / "dgl-resnet32.toml")
    for field in ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                  "warmup_epochs", "warmup_lr", "schedule", "drop_last"):
        assert getattr(cfg, field) == getattr(same, field)


def test_flags_override_a_preset(tmp_path):
    cfg = make_config(CONFIGS / "table1" / "cifar10" / "dgl-resnet32.toml", k=8, epochs=20,
                      dataset="cifar10-shards")
    assert (cfg.k, cfg.epochs, cfg.dataset, cfg.lr) == (8, 20, "cifar10-shards", 0.8)
    # the K=32 column of a ResNet-110 row: the public split has cut points for it
    cfg = make_config(CONFIGS / "table1" / "svhn" / "mlaan-resnet110.toml", k=32)
    rule = expr.build(cfg.rule)
    net = build_network(cfg.model, cfg.k, rule, 10, (3, 32, 32), cfg.split)
    rule.setup(net, DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3))
    assert net.k == 32 and rule.cascades == list(range(1, 31))


@pytest.mark.parametrize("path", ALL, ids=name)
def test_no_tracker_or_machine_references(path):
    text = path.read_text().lower()
    for word in ("iss" + "ue", "session", "/wo" + "rk/", "../shared"):
        assert word not in text


@pytest.mark.parametrize("path", [p for p in ALL if '"cifar10"' in p.read_text()], ids=name)
def test_cifar10_presets_say_what_the_shards_hold(path):
    assert "cifar10-shards" in path.read_text() and "JPEG-recompressed" in path.read_text()


def test_the_man_plus_plus_vit_preset_holds_the_public_recipe():
    cfg = make_config(CONFIGS / "man" / "imagenet-vit_tiny-manpp.toml")
    assert (cfg.rule, cfg.model, cfg.k, cfg.split) == (
        "manpp(linear(pool=cls, norm=true), depth=2)", "vit_tiny", 4, "groups")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.decay_on) == ("adamw", 0.001, 0.05,
                                                                        "all")
    assert (cfg.epochs, cfg.batch_size, cfg.schedule) == (90, 128, "public_imagenet")
    assert cfg.label_smoothing == 0 and cfg.mixup == 0 and cfg.clip_grad is None
    rule = expr.build(cfg.rule)
    net = build_network(cfg.model, cfg.k, rule, 1000, (3, 224, 224), cfg.split)
    assert [len(r) for r in net.unit_ranges] == [4, 3, 3, 3]  # stem + 3 blocks, then 3 each
    aux = rule.setup(net, DataInfo(1000, (3, 224, 224), (0.5,) * 3, (0.5,) * 3))
    assert [len(c) for c in aux["copies"]] == [2, 2, 2] and len(aux["twins"]) == 3
