"""timm backbones: ResNet-34/101/152 (and ConvNeXt) cut into local modules."""

from __future__ import annotations

import inspect
import math

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localearn import expr, registry
from localearn.build import build_network, find_splitter
from localearn.errors import UserError
from localearn.interfaces import DataInfo, PlainContext
from localearn.models.timm_convnext import TimmConvNeXtSplitter
from localearn.models.timm_resnet import TimmResNetSplitter

UNITS = {"resnet34": 17, "resnet101": 34, "resnet152": 51}
SMALL = (3, 32, 32)  # the split is checked on small inputs: 2 CPU cores

_models: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = {}


def backbone(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The registered model in eval mode, a fixed input and its unsplit output (built once)."""
    if name not in _models:
        torch.manual_seed(0)
        model = registry.load("model", name)(num_classes=1000).eval()
        x = torch.randn(2, *SMALL)
        with torch.no_grad():
            _models[name] = (model, x, model(x))
    return _models[name]


def split_output(name: str, k: int) -> torch.Tensor:
    model, x, _ = backbone(name)
    net = TimmResNetSplitter().split(model, k, SMALL).eval()
    assert net.k == k
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("name", UNITS)
def test_unit_count_and_finest_split_is_exact(name):
    model, _, ref = backbone(name)
    units = TimmResNetSplitter().units(model)
    assert len(units) == UNITS[name]
    # the stem ends with the max-pool: 32x32 input -> 8x8 after the stem
    net = TimmResNetSplitter().split(model, UNITS[name], SMALL)
    assert net.unit_shapes[0] == (64, 8, 8)
    assert all(len(r) == 1 for r in net.unit_ranges)
    assert torch.equal(split_output(name, UNITS[name]), ref)


@pytest.mark.parametrize("name", UNITS)
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_split_forward_equals_unsplit_for_any_k(name, data):
    k = data.draw(st.integers(1, UNITS[name]), label="K")
    assert torch.equal(split_output(name, k), backbone(name)[2])


def test_registry_picks_the_timm_splitter_and_checks_k():
    rule = expr.build("dgl")
    net = build_network("resnet34", 17, rule, 10, SMALL)
    assert net.k == 17 and net.local_modules[-1][-1][-1].out_features == 10
    assert isinstance(find_splitter(timm.create_model("resnet18"), "resnet18"),
                      TimmResNetSplitter)
    with pytest.raises(UserError, match="valid K is 1..17"):
        build_network("resnet34", 18, rule, 10, SMALL)


def test_no_weights_are_ever_downloaded():
    with pytest.raises(ValueError, match="never downloads"):
        registry.load("model", "resnet34")(num_classes=10, pretrained=True)


def test_dropout_before_fc_is_kept():
    model = timm.create_model("resnet18", num_classes=5, drop_rate=0.3)
    net = TimmResNetSplitter().split(model, 3, SMALL)
    drops = [m for m in net.local_modules[-1].modules() if isinstance(m, torch.nn.Dropout)]
    assert [d.p for d in drops] == [0.3]
    model.eval(), net.eval()
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(k=st.integers(1, 13))
def test_convnext_splits_exactly(k):
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=7).eval()  # 1 + 12 units
    splitter = TimmConvNeXtSplitter()
    assert splitter.accepts(model) and not TimmResNetSplitter().accepts(model)
    assert len(splitter.units(model)) == 13
    net = splitter.split(model, k, SMALL).eval()
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))


def _expression(name: str) -> str:
    """The rule alone, or wrapped around dgl when it is a decorator (``mlaan(dgl)``)."""
    cls = registry.load("rule", name)
    nested = [p for p in inspect.signature(cls).parameters.values()
              if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return f"{name}({', '.join(['dgl'] * len(nested))})" if nested else name


@pytest.mark.slow
@pytest.mark.parametrize("rule_name", list(registry.available("rule")))
def test_every_rule_trains_resnet34_at_224(rule_name):
    # K=17 for local rules: a head on every boundary, from 64x56x56 down to 512x7x7.
    torch.manual_seed(0)
    rule = expr.build(_expression(rule_name))
    shape = (3, 224, 224)
    info = DataInfo(1000, shape, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    net = build_network("resnet34", None if rule_name == "bp" else 17, rule, 1000, shape)
    if net.k > 1:
        assert net.feature_shapes[0] == (64, 56, 56) and net.feature_shapes[-1] == (512, 7, 7)
    aux = rule.setup(net, info)
    net.train(), aux.train()
    images, targets = torch.randn(2, *shape), torch.tensor([3, 998])
    result = rule.train_step(PlainContext(), net, images, targets)
    assert math.isfinite(result.loss) and result.logits.shape == (2, 1000)
    for i, module in enumerate(net.local_modules):  # every module got a gradient
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"module {i} got no gradient"


@pytest.mark.parametrize("name", UNITS)
def test_zero_init_last_zeroes_every_blocks_last_norm_and_only_with_the_option(name):
    from timm.models.resnet import BasicBlock, Bottleneck

    from localearn.models import timm_resnet

    def last_norms(model):  # bn2 of a BasicBlock, bn3 of a Bottleneck (timm's block classes)
        return [m.bn3 if isinstance(m, Bottleneck) else m.bn2 for m in model.modules()
                if isinstance(m, (BasicBlock, Bottleneck))]

    blocks = UNITS[name] - 1
    factory = getattr(timm_resnet, name)
    torch.manual_seed(0)
    zero = last_norms(factory(num_classes=10, zero_init_last=True))
    plain = last_norms(factory(num_classes=10))
    assert len(zero) == len(plain) == blocks
    assert all(bool((n.weight == 0).all()) for n in zero)
    assert all(bool((n.weight == 1).all()) for n in plain)
    variant = getattr(timm_resnet, f"{name}_zero_init")(num_classes=10)
    assert all(bool((n.weight == 0).all()) for n in last_norms(variant))
    assert [n.weight.shape for n in last_norms(variant)] == [n.weight.shape for n in plain]
    if f"{name}-zero-init" in registry.available("model"):  # the registered variant
        built = registry.load("model", f"{name}-zero-init")(num_classes=10)
        assert all(bool((n.weight == 0).all()) for n in last_norms(built))
