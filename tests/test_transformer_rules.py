"""Rules whose heads were made for feature maps, over ViT token boundaries: the patch grid view
(checked against the patch embedding's own convolution), InfoPro, HPFF and the public DGL head
on the grid, AugLocal's copied transformer blocks, MAN++'s ViT auxiliary network, gradient
isolation of each, and one-line refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from localearn import expr, registry
from localearn.build import build_network, build_run
from localearn.config import make_config
from localearn.errors import UserError
from localearn.interfaces import DataInfo
from localearn.models.timm_any import create
from localearn.models.timm_vit import TimmViTSplitter
from localearn.models.token_grid import GridHead, token_grid
from localearn.testing import check_isolation

pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread
SHAPE = (3, 32, 32)
INFO = DataInfo(10, SHAPE, (0.5,) * 3, (0.25,) * 3)
TINY_VIT = dict(patch_size=8, depth=4, embed_dim=32, num_heads=2)  # a 4x4 grid, 4 blocks


def grid_vit(num_classes: int = 10, input_shape: tuple[int, int, int] = SHAPE) -> nn.Module:
    return create("vit_tiny_patch16_224", num_classes, input_shape, dict(TINY_VIT))


def dropping_vit(num_classes: int = 10, input_shape: tuple[int, int, int] = SHAPE) -> nn.Module:
    return create("vit_tiny_patch16_224", num_classes, input_shape,
                  dict(TINY_VIT, patch_drop_rate=0.25))


def swin(num_classes: int = 10, input_shape: tuple[int, int, int] = SHAPE) -> nn.Module:
    return create("swin_tiny_patch4_window7_224", num_classes, input_shape,
                  dict(window_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2)))


@pytest.fixture(scope="module", autouse=True)
def models():
    for name, factory in (("grid_vit", grid_vit), ("dropping_vit", dropping_vit),
                          ("tiny_swin2", swin)):
        registry.register("model", name, factory)
    yield
    for name in ("grid_vit", "dropping_vit", "tiny_swin2"):
        registry._SESSION["model"].pop(name, None)


@pytest.mark.parametrize("variant", [{}, dict(reg_tokens=2), dict(class_token=False,
                                                                    global_pool="avg")])
def test_the_grid_view_is_the_patch_embeddings_feature_map(variant):
    # with no position embedding, the patch tokens on their grid are the output of the patch
    # embedding's convolution: patch (i, j) of the image at row i, column j of the grid
    torch.manual_seed(0)
    vit = create("vit_tiny_patch16_224", 10, SHAPE, dict(TINY_VIT, **variant))
    with torch.no_grad():
        vit.pos_embed.zero_()
    net = TimmViTSplitter().split(vit, 2, SHAPE).eval()
    grid = token_grid(net)
    assert grid is not None and (grid.height, grid.width) == (4, 4)
    assert grid.prefix == vit.num_prefix_tokens
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(grid.view(net.units[0](x)), vit.patch_embed.proj(x))
    # changing one 8x8 patch of the image changes one cell of the grid
    y = x.clone()
    y[:, :, 8:16, 24:32] += 1.0
    with torch.no_grad():
        changed = (grid.view(net.units[0](y)) != grid.view(net.units[0](x))).any(dim=(0, 1))
    assert changed.nonzero().tolist() == [[1, 3]]


def test_no_grid_under_patch_dropout_or_on_feature_maps():
    net = build_network("dropping_vit", 2, expr.build("dgl"), 10, SHAPE)
    assert token_grid(net) is None
    assert token_grid(build_network("resnet32", 4, expr.build("dgl"), 10, SHAPE)) is None


@pytest.mark.parametrize("rule, k, reach", [
    ("infopro", 3, 1),
    ("hpff(dgl)", 4, 2),
    ("dgl(style=public)", 3, 1),
    ("auglocal(merge_tail=false)", 4, 1),
    ("mlaan(infopro, k=2)", 4, 2),
    ("manpp(linear(pool=cls, norm=true), depth=2)", 3, 2),
])
def test_map_heads_and_copied_blocks_over_vit_are_gradient_isolated(rule, k, reach):
    check_isolation(rule, model="grid_vit", k=k, reach=reach)


def test_infopro_on_tokens_rebuilds_the_image_from_the_grid():
    run = build_run(make_config(rule="infopro", model="grid_vit", k=3, device="cpu"), info=INFO)
    head = run.aux[0]
    assert isinstance(head, GridHead) and head.inner.shape == (32, 4, 4)
    tokens = torch.randn(2, 17, 32, requires_grad=True)
    images = torch.rand(2, *SHAPE)
    loss = head.loss(tokens, torch.tensor([1, 2]), images)
    loss.backward()
    assert torch.isfinite(loss)
    assert tokens.grad[:, 0].abs().sum() == 0  # the class token is not on the grid
    assert tokens.grad[:, 1:].abs().sum() > 0
    assert head.inner.reconstruct(head.grid.view(tokens)).shape == (2, *SHAPE)


def test_auglocal_over_vit_copies_later_blocks_with_fresh_weights():
    run = build_run(make_config(rule="auglocal(d=2, merge_tail=false)", model="grid_vit", k=5,
                                device="cpu"), info=INFO)
    head, blocks = run.aux[0], run.net.units
    assert head.layers == [2, 4]  # uniformly sampled later blocks, always the last one
    for copy, u in zip(head.blocks, head.layers):
        assert type(copy) is type(blocks[u])
        own = dict(copy.named_parameters())
        for name, p in blocks[u].named_parameters():
            assert own[name].shape == p.shape
            assert own[name].data_ptr() != p.data_ptr()
            if p.dim() == 2:  # the linear weights are fresh draws, not the block's
                assert not torch.equal(own[name], p)
    assert head(torch.randn(2, 17, 32)).shape == (2, 10)


def test_manpp_vit_head_is_the_paper_formula():
    # MAN++'s ViT auxiliary network: y = s * LB1(h) + (2 - s) * EMA(h), y = LB2(y), then the
    # class token of LayerNorm(y) into a linear classifier
    run = build_run(make_config(rule="manpp(linear(pool=cls, norm=true), depth=2)",
                                model="grid_vit", k=2, device="cpu", split="groups"), info=INFO)
    rule = run.rule
    units, copies = run.net.units, rule.copies[0]
    assert rule.blocks[0] == [3, 4]  # the next group's first two blocks (stem+2 | 2 blocks)
    assert len(copies) == 2 and list(rule.twins) == ["3"]
    head = rule.cascade_heads[0]
    with torch.no_grad():
        rule.scales[0].fill_(0.7)
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        y = 0.7 * copies[0](h) + 1.3 * rule.twins["3"](h)
        y = copies[1](y)
        want = head.classifier(nn.functional.layer_norm(
            y, (32,), head.norm.weight, head.norm.bias, 1e-6)[:, 0])
        got = head(rule.lam_forward(0, h))
    assert torch.allclose(got, want, atol=1e-6)
    assert units[3] is not copies[0] and torch.equal(units[3].mlp.fc1.weight,
                                                     copies[0].mlp.fc1.weight)


@pytest.mark.parametrize("rule, model, k, says", [
    ("infopro", "dropping_vit", 3, "turn patch dropout off"),
    ("hpff(dgl)", "dropping_vit", 3, "no fixed patch grid"),
    ("auglocal", "tiny_swin2", 4, "auglocal builds its auxiliary blocks as ResNet blocks"),
    ("linear(pool=cls)", "resnet32", 4, "pool=cls and norm=true act on (T, D) token"),
    ("man(dgl, depth=3)", "grid_vit", 3, "module 1 has 2; at K=3 valid: depth <= 2"),
])
def test_what_cannot_work_is_one_line(rule, model, k, says):
    with pytest.raises(UserError) as err:
        build_run(make_config(rule=rule, model=model, k=k, device="cpu"), info=INFO)
    assert "\n" not in str(err.value) and says in str(err.value), str(err.value)


TOKEN_RULES = ["dgl", "linear", "infopro", "hpff(dgl)", "dgl(style=public)",
               "auglocal(merge_tail=false)", "mlaan(dgl, k=2)",
               "manpp(linear(pool=cls, norm=true), depth=2)"]


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(TOKEN_RULES), st.integers(2, 5), st.integers(0, 3))
def test_isolation_over_vit_splits_for_any_k_and_rule(rule, k, seed):
    # reach 2 for cascades of two modules (mlaan k=2, hpff) and heads that run copies of
    # the next module's blocks (manpp)
    reach = 2 if rule.startswith(("mlaan", "manpp", "hpff")) else 1
    if rule.startswith("manpp"):
        k = min(k, 3)  # depth=2 needs two blocks in every module after the first: K <= 3
    # two classes: a batch of 4 always holds a pair of one class, which InfoPro's contrastive
    # loss needs to have any gradient at all
    check_isolation(rule, model="grid_vit", k=k, reach=reach, seed=seed,
                    info=DataInfo(2, SHAPE, (0.5,) * 3, (0.25,) * 3))
