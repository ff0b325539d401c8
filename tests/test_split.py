import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from localearn.errors import UserError
from localearn.models.cifar_resnet import CifarResNetSplitter, resnet32, resnet110

MODELS = {"resnet32": (resnet32, 16), "resnet110": (resnet110, 55)}


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(MODELS)), st.data())
def test_split_forward_equals_backbone(name, data):
    factory, units = MODELS[name]
    k = data.draw(st.integers(1, units), label="k")
    torch.manual_seed(k)
    backbone = factory(num_classes=10).eval()
    net = CifarResNetSplitter().split(backbone, k, (3, 32, 32))
    assert net.k == k
    assert sum(len(r) for r in net.unit_ranges) == units
    sizes = [len(r) for r in net.unit_ranges]
    assert max(sizes) - min(sizes) <= 1  # units grouped evenly
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), backbone(x))


def test_split_covers_every_parameter_once():
    backbone = resnet32()
    net = CifarResNetSplitter().split(backbone, 5, (3, 32, 32))
    assert {id(p) for p in net.parameters()} == {id(p) for p in backbone.parameters()}


@pytest.mark.parametrize("name,bad", [("resnet32", 17), ("resnet32", 0), ("resnet110", 56)])
def test_k_out_of_range_names_the_range(name, bad):
    factory, units = MODELS[name]
    with pytest.raises(UserError, match=rf"valid K is 1\.\.{units}"):
        CifarResNetSplitter().split(factory(), bad, (3, 32, 32))


def test_registered_with_timm():
    import timm

    assert sum(p.numel() for p in timm.create_model("resnet32").parameters()) == \
        sum(p.numel() for p in resnet32().parameters())
    assert len(CifarResNetSplitter().units(timm.create_model("resnet110"))) == 55
