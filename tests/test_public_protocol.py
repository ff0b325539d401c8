"""The presets that reproduce the public MLAAN code build what that code builds: its DGL head
for the independent and the cascade heads, its leap tables (and how far localearn's leap policy
is from them), and the zero-initialised residual BatchNorm of its ImageNet ResNet-34, carried
by the copies made from the blocks. Expected values are written from the public code's
structure (docs/presets.md), not from the code under test."""

from __future__ import annotations

import pytest
import torch
from localearn_plugins.dgl import PublicDGLHead

from localearn import expr
from localearn.interfaces import DataInfo
from localearn.models.cifar_resnet import CifarResNetSplitter, resnet32
from localearn.models.timm_resnet import TimmResNetSplitter, resnet34, resnet34_zero_init

INFO = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3)


def public_head_parameters(c: int, classes: int = 10) -> int:
    """The public auxDGL head, counted layer by layer: three 1x1 convs to 128 (no bias) with
    BatchNorm, a 128-512-512-512 MLP (bias) with BatchNorm1d, a 512-to-classes classifier."""
    convs = c * 128 + 128 * 128 * 2 + 3 * 2 * 128
    mlp = (128 * 512 + 512) + 2 * (512 * 512 + 512) + 3 * 2 * 512
    return convs + mlp + 512 * classes + classes


def setup(rule_text: str, k: int = 16):
    torch.manual_seed(0)
    rule = expr.build(rule_text)
    net = CifarResNetSplitter().split(resnet32(), k, INFO.input_shape, model_name="resnet32")
    rule.configure(net)
    return rule, net, rule.setup(net, INFO)


def test_public_dgl_head_serves_the_independent_and_the_cascade_heads():
    rule, net, aux = setup("mlaan(dgl(style=public), leaps=public)")
    assert len(aux["heads"]) == 15 and len(aux["cascade_heads"]) == 13
    for head in [*aux["heads"], *aux["cascade_heads"]]:
        assert isinstance(head, PublicDGLHead)
    widths = [net.feature_shapes[i][0] for i in range(15)]
    for head, c in zip(aux["heads"], widths):
        assert sum(p.numel() for p in head.parameters()) == public_head_parameters(c)
    # every public leap chain ends at the last block (64 channels)
    assert public_head_parameters(16) == 635_146
    for head in aux["cascade_heads"]:
        assert sum(p.numel() for p in head.parameters()) == public_head_parameters(64)


# The public ResNet-32 "K=15" leap table (configAuxPlus_new), by its module index, as
# [stage, block] pairs; its module m is localearn's module m+1 at K=16 (the stem is module 0).
PUBLIC_R32 = {
    **dict.fromkeys((0, 1, 3), ["2.0", "3.0", "3.2", "3.4"]),
    **dict.fromkeys((2, 4), ["2.0", "3.0", "3.3", "3.4"]),
    **dict.fromkeys(range(5, 10), ["3.0", "3.2", "3.3", "3.4"]),
    10: ["3.1", "3.2", "3.4"], 11: ["3.2", "3.3", "3.4"], 12: ["3.3", "3.4"], 13: ["3.4"],
}


def unit(block: str) -> int:
    stage, b = map(int, block.split("."))
    return 5 * (stage - 1) + b + 1


def test_leaps_public_are_the_public_tables_and_the_policy_differs_on_ten_rows():
    public, _, _ = setup("mlaan(dgl, leaps=public)")
    policy, _, _ = setup("mlaan(dgl)")
    assert public.cascades == policy.cascades == list(range(2, 15))
    want = {m + 1: [unit(b) for b in blocks] for m, blocks in PUBLIC_R32.items()}
    assert {i: b for i, b in zip(public.cascades, public.blocks)} == \
        {i: want[i] for i in range(2, 15)}
    differ = [i for i, a, b in zip(policy.cascades, policy.blocks, public.blocks) if a != b]
    assert differ == list(range(2, 12))  # 10 of the 13 rows; modules 12-14 agree


def last_bn_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """bn2 of every BasicBlock in ``model`` (ResNet-34's residual blocks, and copies of them)."""
    from timm.models.resnet import BasicBlock

    return [m.bn2.weight for m in model.modules() if isinstance(m, BasicBlock)]


@pytest.mark.parametrize("zero", [True, False])
def test_copies_made_after_init_carry_the_zero_init(zero):
    torch.manual_seed(0)
    backbone = (resnet34_zero_init if zero else resnet34)(num_classes=10)
    net = TimmResNetSplitter().split(backbone, 4, INFO.input_shape, model_name="resnet34")
    rule = expr.build("mlaan(linear, k=1, p=2)")
    rule.configure(net)
    aux = rule.setup(net, INFO)
    copies = last_bn_weights(aux["copies"]) + last_bn_weights(aux["twins"])
    assert len(copies) >= 4 and len(last_bn_weights(backbone)) == 16
    for weight in [*last_bn_weights(backbone), *copies]:
        assert bool((weight == 0).all()) is zero
