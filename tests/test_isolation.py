"""Gradient isolation, property-based: a local loss reaches its own module and head only."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from localearn.build import build_run
from localearn.config import make_config
from localearn.interfaces import DataInfo

INFO = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)
UNITS = {"resnet32": 16, "resnet110": 55}


def loss_gradients(rule_text: str, model: str, k: int, j: int):
    run = build_run(make_config(rule=rule_text, model=model, k=k, seed=j, device="cpu"),
                    info=INFO)
    rule, net, heads = run.rule, run.net, run.aux
    images, targets = torch.randn(4, 3, 32, 32), torch.arange(4) % 10
    losses = rule.losses(net, images, targets)
    for _ in range(j):
        next(losses)
    loss, _ = next(losses)
    params = [*net.parameters(), *heads.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return net, heads, {id(p): g for p, g in zip(params, grads)}


def assert_isolated(net, heads, grads, j: int) -> None:
    for i, module in enumerate(net.local_modules):
        for p in module.parameters():
            g = grads[id(p)]
            if i == j:
                assert g is not None
            else:
                assert g is None or torch.count_nonzero(g) == 0
        if i == j:
            assert any(grads[id(p)] is not None and torch.count_nonzero(grads[id(p)]) > 0
                       for p in module.parameters())
    for i, head in enumerate(heads):
        for p in head.parameters():
            g = grads[id(p)]
            if i != j:
                assert g is None or torch.count_nonzero(g) == 0
        if i == j:
            assert all(grads[id(p)] is not None for p in head.parameters())


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(sorted(UNITS)), st.data())
def test_dgl_loss_reaches_its_module_and_head_only(model, data):
    k = data.draw(st.integers(2, min(UNITS[model], 12)), label="k")
    j = data.draw(st.integers(0, k - 1), label="module")
    net, heads, grads = loss_gradients("dgl", model, k, j)
    assert_isolated(net, heads, grads, j)
