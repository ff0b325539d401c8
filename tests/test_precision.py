"""Mixed precision on CPU: bf16 autocast trains DGL past the 90% bar on the embedded digits;
fp16 runs through the gradient scaler.

On CPUs without bf16 instructions (AVX2 only, like CI's), PyTorch runs bf16 3x3 convolutions
on a slow reference kernel, 10 to 50 times slower than float32, so a bf16 ResNet-32 epoch takes
minutes there. These tests therefore train a small CNN (3x3 convs on the 8x8 digits), registered
the way a third-party package registers a model: a distribution on sys.path whose entry points
name it and its splitter.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from localearn.cli import main
from localearn.config import make_config
from localearn.engine import Trainer

PLUGIN = '''
from torch import nn
from localearn.interfaces import LocalModuleSplitter


def _cbr(cin, cout):
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class TinyNet(nn.Module):
    """4x4 average pooling (back to the digits' 8x8), three 3x3 conv units, a linear head."""

    def __init__(self, num_classes=10, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.AvgPool2d(4), *_cbr(3, c))
        self.blocks = nn.Sequential(nn.Sequential(*_cbr(c, c)), nn.Sequential(*_cbr(c, c)))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 64, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def tinynet(num_classes=10):
    return TinyNet(num_classes)


class TinySplitter(LocalModuleSplitter):
    def accepts(self, backbone):
        return isinstance(backbone, TinyNet)

    def units(self, backbone):
        return [backbone.stem, *backbone.blocks]

    def classifier(self, backbone):
        return backbone.head
'''


@pytest.fixture
def tinynet(tmp_path, monkeypatch):
    """Register ``p7tinynet`` (model and splitter) through entry points, for this test."""
    root = tmp_path / "site"
    (root / "p7tinynet_plugin-0.1.dist-info").mkdir(parents=True)
    (root / "p7tinynet_plugin.py").write_text(PLUGIN)
    info = root / "p7tinynet_plugin-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: p7tinynet-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [localearn.models]
        p7tinynet = p7tinynet_plugin:tinynet

        [localearn.splitters]
        p7tinynet = p7tinynet_plugin:TinySplitter
        """))
    monkeypatch.syspath_prepend(str(root))
    return "p7tinynet"


def test_bf16_autocast_trains_dgl_above_90_percent_on_digits(tinynet, tmp_path):
    cfg = make_config(rule="dgl", model=tinynet, k=3, epochs=3, batch_size=64, lr=0.05,
                      precision="bf16", device="cpu", progress=False, output_dir=tmp_path / "r")
    trainer = Trainer(cfg)
    seen: set[torch.dtype] = set()
    first_conv = trainer.net.local_modules[0][0][1]
    first_conv.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)
    result = trainer.fit()
    assert seen == {torch.bfloat16}  # the convolutions really ran in bf16 ...
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())  # ... weights fp32
    assert result.test_acc > 0.90, result.history


def test_fp16_goes_through_the_gradient_scaler(tinynet, tmp_path):
    cfg = make_config(rule="dgl", model=tinynet, k=3, epochs=1, batch_size=64,
                      train_limit=256, precision="16", channels_last=True, device="cpu",
                      progress=False, output_dir=tmp_path / "r")
    trainer = Trainer(cfg)
    assert trainer.scaler.is_enabled()
    assert trainer.stepper.ctx.scaler is trainer.scaler  # rules scale every local loss
    scaled: list[float] = []
    head = trainer.net.local_modules[-1][-1][-1]  # the classifier's Linear
    head.weight.register_hook(lambda g: scaled.append(g.abs().max().item()))
    result = trainer.fit()
    assert result.train_loss == result.train_loss  # finite, not NaN
    final = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    scale = final["scaler"]["scale"]
    assert scale >= 1.0 and scale == 2.0 ** round(torch.tensor(scale).log2().item())
    assert max(scaled) > 100.0  # gradients were computed on the scaled loss (2^16 at first)


def test_unknown_precision_is_one_line(capsys):
    assert main(["fit", "--precision", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown precision '8'; valid: 32, bf16, 16" in err
