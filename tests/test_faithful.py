"""Faithful by default: MLAAN's cascades as the paper defines them, checked against an oracle
written from equations (3)-(7), its defaults also through the engine's own step; the public
heads; leap tables and splits by name; InfoPro's defaults by dataset."""

from __future__ import annotations

import copy
import types
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from localearn_plugins.dgl import DGLHead, PublicDGLHead
from localearn_plugins.infopro import DEFAULTS, identify_dataset
from localearn_plugins.linear import LinearHead
from localearn_plugins.mlaan_leaps import leap_blocks
from torch import nn
from torch.nn import functional as F

from localearn import expr
from localearn.build import build_network, build_run
from localearn.config import make_config
from localearn.errors import UserError
from localearn.interfaces import DataInfo, PlainContext
from localearn.models.cifar_resnet import (
    PUBLIC_SPLITS,
    CifarResNetSplitter,
    resnet32,
    resnet110,
)

INFO = DataInfo(10, (3, 16, 16), (0.5,) * 3, (0.25,) * 3)  # small images: a fast oracle
CIFAR = DataInfo(10, (3, 32, 32), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
BLOCKS = {"resnet32": 5, "resnet110": 18}
R = 0.9  # EMA rate: visible movement in two steps


# ------------------------------------------------------------------ the paper-literal oracle


def linear_head(index, shape) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[0], 10))


def dgl_head(index, shape) -> nn.Module:
    return DGLHead(shape, INFO)  # the base rule's head class, not MLAAN code


def ce_loss(head, x, targets, images):
    return F.cross_entropy(head(x), targets)


def own_loss(head, x, targets, images):
    """A base rule's head with a loss of its own (InfoPro: reconstruction and task)."""
    return head.loss(x, targets, images)


def load_by_order(own: nn.Module, theirs: nn.Module) -> None:
    """Copy ``theirs``' initial weights into ``own`` (same layers, maybe other names)."""
    values = list(theirs.state_dict().values())
    own.load_state_dict(dict(zip(own.state_dict(), values, strict=True)))


class PaperMLAAN(nn.Module):
    """MLAAN as equations (3)-(7) read, on its own copy of the backbone.

    Modules f_0..f_{K-1} (0-based). A cascade is k consecutive modules; the one ending at
    module e spans e-k+1..e and exists for k-1 <= e <= K-2 (section III-B: the first cascade
    is f_1..f_k; MLAAN covers the first K-1 modules, section IV-B). ``short`` adds the
    truncated cascades that end at e < k-1. Module j < K-1 gets eta_d (wx) times its
    independent loss (eq. 3, first term of eq. 5) and eta_c (wy) times every cascade loss of a
    cascade that contains it (eq. 4, the sum in eq. 5); the last min(k, K) modules get the
    final cross-entropy. The LAM of cascade e (section III-C) copies the blocks ``leaps[e]``
    twice, phi' (trained by the cascade loss) and phi'' (EMA, eq. 7; only the first block with
    ``ema_all`` false); each step is phi'(z) + phi''(z). Every backward pass is one sum of all
    losses.
    """

    def __init__(self, net, k: int, short: bool, leaps: dict[int, list[int]], ema_all: bool,
                 make_head, wx: float = 0.001, wy: float = 0.999, loss=ce_loss) -> None:
        super().__init__()
        self.net, self.k, self.wx, self.wy, self.leaps = net, k, wx, wy, leaps
        self.loss = loss  # L(head, features, y, images): cross-entropy of the head's logits
        K = net.k
        self.ends = [e for e in range(K - 1) if short or e >= k - 1]
        self.g = nn.ModuleList(make_head(j, net.feature_shapes[j]) for j in range(K - 1))
        self.h, self.phi1, self.phi2 = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for e in self.ends:
            units = leaps[e]
            self.phi1[str(e)] = nn.ModuleList(copy.deepcopy(net.units[b]) for b in units)
            self.phi2[str(e)] = nn.ModuleDict(
                {str(j): copy.deepcopy(net.units[b]).requires_grad_(False)
                 for j, b in enumerate(units) if j == 0 or ema_all})
            shape = net.unit_shapes[units[-1]] if units else net.feature_shapes[e]
            self.h[str(e)] = make_head(e, shape)

    def span(self, e: int) -> range:
        return range(max(0, e - self.k + 1), e + 1)

    def signals(self) -> list[int]:
        """How many cascade losses reach each module (eq. 5's sum)."""
        return [sum(j in self.span(e) for e in self.ends) for j in range(self.net.k)]

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def step(self, images, targets) -> None:
        net, K = self.net, self.net.k
        f = net.local_modules
        inputs, x = [], images
        for module in f:  # x_{j+1} = f_j(x_j), each module's input detached
            inputs.append(x.detach())
            x = module(x.detach())
        stats = {n: b.clone() for n, b in net.named_buffers()}  # BN moved once, as in training
        loss = 0.0
        for j in range(K - 1):  # independent: eta_d * L(g_j(x_{j+1}), y)
            loss = loss + self.wx * self.loss(self.g[j], f[j](inputs[j]), targets, images)
        for e in self.ends:  # cascade e: f_{e-k+1}..f_e, the LAM, then h_e
            z = inputs[self.span(e)[0]]
            for j in self.span(e):
                z = f[j](z)
            for j, _ in enumerate(self.leaps[e]):
                out = self.phi1[str(e)][j](z)
                if str(j) in self.phi2[str(e)]:
                    out = out + self.phi2[str(e)][str(j)](z)
                z = out
            loss = loss + self.wy * self.loss(self.h[str(e)], z, targets, images)
        z = inputs[max(0, K - self.k)]
        for j in range(max(0, K - self.k), K):
            z = f[j](z)
        loss = loss + F.cross_entropy(z, targets)
        loss.backward()
        with torch.no_grad():  # the repeated forwards must not move BN statistics again
            for n, b in net.named_buffers():
                b.copy_(stats[n])

    @torch.no_grad()
    def ema(self, r: float) -> None:
        """Eq. (7) on every twin: lambda <- r * lambda + (1 - r) * (the real block); the BN
        buffers are copied from the real block (the paper is silent; localearn's choice)."""
        for e in self.ends:
            for j, twin in self.phi2[str(e)].items():
                real = self.net.units[self.leaps[e][int(j)]]
                for t, p in zip(twin.parameters(), real.parameters(), strict=True):
                    t.copy_(r * t + (1 - r) * p)
                for t, b in zip(twin.buffers(), real.buffers(), strict=True):
                    t.copy_(b)


def draw_leaps(data, net, ends: list[int], p: int) -> dict[int, list[int]]:
    """A random valid leap table: for each cascade end, up to p later units in order, every
    shape-changing unit before the last one included (a chain cannot skip a stage change)."""
    table = {}
    for e in ends:
        last = net.unit_ranges[e][-1]
        later = list(range(last + 1, len(net.units)))
        changes = [u for u in later if net.unit_shapes[u] != net.unit_shapes[u - 1]]
        chosen = data.draw(st.lists(st.sampled_from(later), max_size=p, unique=True),
                           label=f"leaps {e}")
        chain = sorted(set(chosen) | {u for u in changes if chosen and u < max(chosen)})
        table[e] = chain[:p]
    return table


def routed(trace: list[str]) -> dict[int, set[str]]:
    """Which losses the rule sent back through each module, from its trace."""
    out: dict[int, set[str]] = defaultdict(set)
    for entry in trace:
        if " @ module " in entry:
            name, j = entry.split(" @ module ")
            out[int(j)].add(name)
    return out


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


@contextmanager
def float64():
    """Both sides in float64: ResNet-110's BatchNorm on 4 images amplifies float32 rounding
    (summation order) to 1e-4 in two steps; in float64 the two agree to about 1e-12."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def check_against_oracle(model, K, k, p, ema_all, short, recompute, fuse, leaps_of, kind,
                         seed=0):
    with float64():
        return _check_against_oracle(model, K, k, p, ema_all, short, recompute, fuse, leaps_of,
                                     kind, seed)


def _check_against_oracle(model, K, k, p, ema_all, short, recompute, fuse, leaps_of, kind,
                          seed):
    torch.manual_seed(seed)
    net = build_network(model, K, expr.build("linear"), 10, INFO.input_shape)
    ends = [e for e in range(K - 1) if short or e >= k - 1]
    leaps = leaps_of(net, ends)
    table = "; ".join(f"{e}:{','.join(map(str, units))}" for e, units in leaps.items())
    text = (f"mlaan({kind}, k={k}, p={p}, ema={R}, ema_blocks={'all' if ema_all else 'first'}, "
            f"short_cascades={short}, recompute={recompute}, fuse={fuse}"
            + (f", leaps='{table}')" if table else ")"))
    rule = expr.build(text)
    paper_net = copy.deepcopy(net)  # same initial weights, before the rule copies anything
    aux = rule.setup(net, INFO)
    oracle = PaperMLAAN(paper_net, k, short, leaps, ema_all,
                        linear_head if kind == "linear" else dgl_head)
    # the structure: cascades end where the paper says, with the LAMs of the explicit table
    assert rule.cascades == oracle.ends
    assert rule.blocks == [leaps[e] for e in oracle.ends]
    for j, head in enumerate(rule.heads):
        load_by_order(oracle.g[j], head)
    for c, e in enumerate(rule.cascades):
        load_by_order(oracle.h[str(e)], rule.cascade_heads[c])
    opt = sgd([q for q in [*net.parameters(), *aux.parameters()] if q.requires_grad])
    opt_paper = sgd(oracle.trainable())
    twins_before = {b: copy.deepcopy(t.state_dict()) for b, t in rule.twins.items()}
    gen = torch.Generator().manual_seed(seed)
    for step in range(2):  # two steps: the second sees the twins that eq. (7) moved
        images = torch.randn(4, *INFO.input_shape, generator=gen)
        targets = torch.randint(0, 10, (4,), generator=gen)
        opt.zero_grad(set_to_none=True)
        rule.train_step(PlainContext(), net, images, targets)
        opt.step()
        rule.after_step()
        opt_paper.zero_grad(set_to_none=True)
        oracle.step(images, targets)
        opt_paper.step()
        oracle.ema(R)
        if step == 0:  # how many cascade signals each module receives
            sent = routed(rule.trace)
            got = [len({n for n in sent[j] if n.startswith("cascade")}) for j in range(K)]
            assert got == oracle.signals()
            assert {j for j in range(K) if "final" in sent[j]} == set(range(max(0, K - k), K))
    assert_same_state(rule, net, paper_net, oracle, leaps, twins_before, R)
    return oracle


def assert_same_state(rule, net, paper_net, oracle, leaps, twins_before, r,
                      close=None) -> None:
    """Every parameter and statistic of the rule's run equals the oracle's, and every twin
    moved (for r < 1)."""
    close = close or dict(rtol=1e-9, atol=1e-11)
    for a, b in zip(net.parameters(), paper_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, **close)
    for a, b in zip(net.buffers(), paper_net.buffers(), strict=True):
        torch.testing.assert_close(a, b, **close)
    for j, head in enumerate(rule.heads):
        for a, b in zip(head.parameters(), oracle.g[j].parameters(), strict=True):
            torch.testing.assert_close(a, b, **close)
    for c, e in enumerate(rule.cascades):
        for a, b in zip(rule.cascade_heads[c].parameters(), oracle.h[str(e)].parameters(),
                        strict=True):
            torch.testing.assert_close(a, b, **close)
        for a, b in zip(rule.copies[c].parameters(), oracle.phi1[str(e)].parameters(),
                        strict=True):
            torch.testing.assert_close(a, b, **close)
        for j, twin in oracle.phi2[str(e)].items():  # the rule shares twins per real block
            mine = rule.twins[str(leaps[e][int(j)])]
            for a, b in zip(mine.parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(a, b, **close)
            for a, b in zip(mine.buffers(), twin.buffers(), strict=True):
                torch.testing.assert_close(a, b, **close)
    for b, twin in rule.twins.items():
        if r < 1:
            assert any(not torch.equal(t, twins_before[b][n])
                       for n, t in twin.named_parameters()), f"twin {b} never moved"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(sorted(BLOCKS)), data=st.data())
def test_rule_equals_the_paper_oracle_over_two_sgd_steps(model, data):
    K = data.draw(st.integers(1, 9), label="K")
    k = data.draw(st.integers(1, 4), label="k")
    p = data.draw(st.integers(0, 4), label="p")
    ema_all = data.draw(st.booleans(), label="ema_blocks=all")
    short = data.draw(st.booleans(), label="short_cascades")
    recompute = data.draw(st.booleans(), label="recompute")
    fuse = data.draw(st.booleans(), label="fuse")
    oracle = check_against_oracle(model, K, k, p, ema_all, short, recompute, fuse,
                                  lambda net, ends: draw_leaps(data, net, ends, p), "linear")
    # the paper's count: a module inside the cascades' reach gets exactly k cascade signals;
    # by default the first modules get fewer (no cascade ends before module k-1)
    signals = oracle.signals()
    for j in range(K):
        if k - 1 <= j <= K - 1 - k or (short and j <= K - 1 - k):
            assert signals[j] == k
        if not short and j < k - 1:
            assert signals[j] == max(0, min(j + k - 1, K - 2) - (k - 1) + 1)


@pytest.mark.parametrize("recompute", [False, True])
def test_over_dgl_heads_equals_the_paper_oracle(recompute):
    # DGL's heads hold BatchNorm; ResNet-32 K=8, k=3 and a leap table with two twins
    def leaps(net, ends):
        return {e: [u for u in (6, 11, 13, 15) if u > net.unit_ranges[e][-1]] for e in ends}

    check_against_oracle("resnet32", 8, 3, 4, True, False, recompute, True, leaps, "dgl")


# ------------------------------------------------------------- the defaults, through the engine

# The leap table of the defaults (p=4) at ResNet-32 K=16, one block per module (unit u is
# module u; units 1-5 are stage 1 at 16 channels, 6-10 stage 2 at 32, 11-15 stage 3 at 64),
# written from the paper's description: each LAM copies p later hidden layers "distributed
# across the early, intermediate, and deeper layers of the subsequent local modules" (III-C).
# So: the deepest block (15); the first block of every later stage (6, 11), without which a
# chain of copied blocks cannot change width; the rest evenly spaced among the other later
# blocks (one left to place: the middle one, the later of two middles at an even position;
# two: at the thirds). Fewer than p later blocks: all of them. Modules 2..14 end a cascade.
DEFAULT_LEAPS_R32_K16 = {
    2: [6, 9, 11, 15],     # middle of 3,4,5,7,8,9,10,12,13,14 (10 left): 8 or 9 -> 9
    3: [6, 9, 11, 15],     # middle of 4,5,7,8,9,10,12,13,14: 9
    4: [6, 9, 11, 15],     # middle of 5,7,8,9,10,12,13,14: 9 or 10 -> 9
    5: [6, 10, 11, 15],    # middle of 7,8,9,10,12,13,14: 10
    6: [9, 11, 12, 15],    # thirds of 7,8,9,10,12,13,14: 9, 12
    7: [9, 11, 13, 15],    # thirds of 8,9,10,12,13,14: 9, 13
    8: [10, 11, 13, 15],   # thirds of 9,10,12,13,14: 10, 13
    9: [11, 12, 13, 15],   # thirds of 10,12,13,14: 12, 13
    10: [11, 12, 14, 15],  # thirds of 12,13,14: 12, 14
    11: [12, 13, 14, 15],  # four later blocks: all
    12: [13, 14, 15],
    13: [14, 15],
    14: [15],
}
# the paper (IV-C): SGD with Nesterov momentum 0.9 and weight decay 1e-4; k=3 (III-B); the
# loss weights and EMA rate of the public code (wx 0.001, wy 0.999, r 0.995), twins on the
# first copied block, updated after every optimizer step by eq. (7)
PAPER_SGD = dict(momentum=0.9, nesterov=True, weight_decay=1e-4)


def test_default_leap_policy_is_the_table():
    shapes = build_network("resnet32", 16, expr.build("linear"), 10, (3, 32, 32)).unit_shapes
    for module, units in DEFAULT_LEAPS_R32_K16.items():
        assert leap_blocks(shapes, module, 4) == units, module  # module m ends with unit m


def engine_defaults_against_oracle(base: str, loss, make_head, close=None) -> None:
    """Bare ``mlaan(<base>)`` (every MLAAN option at its default) trained for two steps by the
    engine's own step (``build_run(...).step``: zero_grad, the rule, the optimizer step,
    ``after_step``), against the oracle with the paper's settings written out."""
    with float64():
        torch.manual_seed(0)
        cfg = make_config(rule=f"mlaan({base})", model="resnet32", k=16, device="cpu",
                          lr=0.05)
        run = build_run(cfg, info=INFO)
        rule, net = run.rule, run.net
        paper_net = copy.deepcopy(net)  # the rule's copies are made from the same weights
        leaps = DEFAULT_LEAPS_R32_K16
        oracle = PaperMLAAN(paper_net, 3, False, leaps, False, make_head(paper_net),
                            wx=0.001, wy=0.999, loss=loss)
        assert rule.cascades == oracle.ends == list(range(2, 15))
        assert rule.blocks == [leaps[e] for e in oracle.ends]
        for j, head in enumerate(rule.heads):
            load_by_order(oracle.g[j], head)
        for c, e in enumerate(rule.cascades):
            load_by_order(oracle.h[str(e)], rule.cascade_heads[c])
        opt_paper = torch.optim.SGD(oracle.trainable(), lr=0.05, **PAPER_SGD)
        twins_before = {b: copy.deepcopy(t.state_dict()) for b, t in rule.twins.items()}
        gen = torch.Generator().manual_seed(1)
        for step in range(2):
            images = torch.randn(4, *INFO.input_shape, generator=gen)
            targets = torch.tensor([3, 3, 7, 7]) if step == 0 else torch.tensor([1, 5, 1, 5])
            run.step(images, targets)
            opt_paper.zero_grad(set_to_none=True)
            oracle.step(images, targets)
            opt_paper.step()
            oracle.ema(0.995)
        assert_same_state(rule, net, paper_net, oracle, leaps, twins_before, 0.995, close)


def test_defaults_over_dgl_through_the_engine_equal_the_paper_oracle():
    engine_defaults_against_oracle("dgl", ce_loss, lambda net: dgl_head)


def test_defaults_over_infopro_through_the_engine_equal_the_paper_oracle():
    # InfoPro's own heads (decoder and SupCon projection, the ramp of its defaults for
    # ResNet-32 K=16), built by the InfoPro rule, not by MLAAN code (its losses cast to float32
    # inside; on these fixed batches both sides still agree to the float64 tolerance)
    def make_head(net):
        base = expr.build("infopro")
        base.configure(net)
        return lambda index, shape: base.make_head(index, net.k, shape, INFO)

    engine_defaults_against_oracle("infopro", own_loss, make_head)


# ------------------------------------------------------------------ cascades by default


def build(text: str, model: str = "resnet32", K: int = 16, info: DataInfo = INFO,
          split: str = "even", seed: int = 0):
    torch.manual_seed(seed)
    rule = expr.build(text)
    net = build_network(model, K, rule, info.num_classes, info.input_shape, split)
    return rule, net, rule.setup(net, info)


@pytest.mark.parametrize("K,k", [(6, 3), (16, 3), (5, 2), (4, 5), (2, 3)])
def test_each_loss_reaches_exactly_its_parameters_by_default(K, k):
    rule, net, aux = build(f"mlaan(linear, k={k}, fuse=false)", K=K)
    assert rule.cascades == list(range(k - 1, K - 1))
    touched: dict[str, set[int]] = {}
    for q in [*net.parameters(), *aux.parameters()]:
        if q.requires_grad:
            q.register_hook(lambda g, q=q: touched.setdefault(
                rule.trace[-1].split(" @")[0], set()).add(id(q)))
    rule.train_step(PlainContext(), net, torch.randn(4, *INFO.input_shape), torch.arange(4))

    def ids(*mods):
        return {id(q) for m in mods for q in m.parameters()}

    mods = net.local_modules
    for i in range(K - 1):
        assert touched[f"independent {i}"] == ids(mods[i], rule.heads[i])
        if i < k - 1:
            assert f"cascade {i}" not in touched  # no cascade ends here
        else:
            c = rule.cascades.index(i)
            span = [mods[j] for j in range(i - k + 1, i + 1)]
            assert touched[f"cascade {i}"] == ids(*span, rule.copies[c], rule.cascade_heads[c])
    assert touched["final"] == ids(*mods[max(0, K - k):])
    assert len(rule.cascade_heads) == len(rule.copies) == len(rule.blocks) == max(0, K - k)


def test_short_cascades_on_mlm_and_lam_unaffected():
    assert build("mlm(linear)", K=8)[0].cascades == [2, 3, 4, 5, 6]
    assert build("mlm(linear, short_cascades=true)", K=8)[0].cascades == list(range(7))
    assert build("mlaan(linear, k=2)", K=8)[0].cascades == list(range(1, 7))
    assert build("lam(linear)", K=8)[0].cascades == list(range(7))  # k=1: every module
    rule = build("mlm(linear)", K=8)[0]
    assert all(blocks == [] for blocks in rule.blocks)  # the head on the module's output


def test_early_modules_report_their_independent_loss_alone():
    rule, net, _ = build("mlaan(linear, k=3)", K=6)
    result = rule.train_step(PlainContext(), net, torch.randn(4, *INFO.input_shape),
                             torch.arange(4))
    assert len(result.local_losses) == 5
    ce = [float(x) for x in result.local_losses]
    assert ce[0] < 0.01 and ce[1] < 0.01  # wx * CE (0.001 * about 2.3)
    assert all(v > 1.0 for v in ce[2:])  # wx * CE + wy * CE


# ------------------------------------------------------------------ the public heads


def n_params(module: nn.Module) -> int:
    return sum(q.numel() for q in module.parameters())


# hand-computed, 10 classes, BatchNorm affine included:
# linear: (C + 1) * 10. DGL's own (C <= 128): 3*C*C + 3*2C (convs, BN) + 3*(4C*4C + 2*4C) (MLP
# without bias, BN) + 4C*10 + 10. Public DGL: C*128 + 2*128*128 + 3*256 (convs, BN) +
# (128*512 + 512) + 2*(512*512 + 512) + 3*1024 (MLP with bias, BN) + 512*10 + 10.
HEAD_PARAMS = {
    16: {"linear": 170, "dgl": 14_186, "public": 635_146},
    32: {"linear": 330, "dgl": 54_474, "public": 637_194},
    64: {"linear": 650, "dgl": 213_386, "public": 641_290},
}


@pytest.mark.parametrize("c,size", [(16, 32), (32, 16), (64, 8)])
def test_head_parameter_counts_at_resnet32_shapes(c, size):
    shape = (c, size, size)
    want = HEAD_PARAMS[c]
    assert n_params(LinearHead(shape, CIFAR)) == want["linear"] == (c + 1) * 10
    assert n_params(DGLHead(shape, CIFAR)) == want["dgl"] == \
        3 * c * c + 6 * c + 3 * (16 * c * c + 8 * c) + 40 * c + 10
    assert n_params(PublicDGLHead(shape, CIFAR)) == want["public"] == \
        c * 128 + 2 * 128 * 128 + 3 * 256 + 128 * 512 + 512 + 2 * (512 * 512 + 512) \
        + 3 * 1024 + 512 * 10 + 10
    x = torch.randn(2, *shape)
    for head in (LinearHead(shape, CIFAR), DGLHead(shape, CIFAR), PublicDGLHead(shape, CIFAR)):
        assert head(x).shape == (2, 10)


def test_public_dgl_head_layers():
    head = PublicDGLHead((32, 16, 16), CIFAR)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.bias) for m in convs] == \
        [(32, 128, (1, 1), None), (128, 128, (1, 1), None), (128, 128, (1, 1), None)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linears] == \
        [(128, 512, True), (512, 512, True), (512, 512, True), (512, 10, True)]


def test_rules_build_the_heads_and_mlaan_linear_is_the_public_model():
    _, net, heads = build("dgl(style=public)", K=16, info=CIFAR)
    widths = [shape[0] for shape in net.feature_shapes]
    assert n_params(heads) == sum(HEAD_PARAMS[c]["public"] for c in widths)
    assert widths.count(16) == 6 and widths.count(32) == 5 and widths.count(64) == 4
    _, _, heads = build("dgl", K=16, info=CIFAR)
    assert n_params(heads) == sum(HEAD_PARAMS[c]["dgl"] for c in widths)
    _, _, heads = build("linear", K=16, info=CIFAR)
    assert n_params(heads) == sum(HEAD_PARAMS[c]["linear"] for c in widths)
    rule, net, aux = build("mlaan(linear, k=2, leaps=public)", K=16, info=CIFAR)
    assert all(isinstance(h, LinearHead) for h in [*rule.heads, *rule.cascade_heads])
    assert rule.cascades == list(range(1, 15)) and rule.cascade_heads[0].shape[0] == 64
    with pytest.raises(UserError, match="style=dgl"):
        expr.build("dgl(style=public, width=2)")
    with pytest.raises(UserError, match="style"):
        expr.build("dgl(style=fancy)")


# ------------------------------------------------------------------ leap tables by name


def unit(model: str, stage: int, block: int) -> int:
    return BLOCKS[model] * (stage - 1) + block + 1


# The public code's leap tables (configAuxPlus_new.py) in its own notation, [stage, block], one
# row per code module index; rows 0.. of K=8 and 32 are modules 0.. here, rows of the code's
# "K=15" and "K=54" are modules 1.. (the stem is module 0 here).
_A32, _B32 = [[2, 0], [3, 0], [3, 2], [3, 4]], [[2, 0], [3, 0], [3, 3], [3, 4]]
_C32 = [[3, 0], [3, 2], [3, 3], [3, 4]]
_A110, _B110 = [[2, 0], [3, 0], [3, 2], [3, 17]], [[3, 0], [3, 2], [3, 3], [3, 17]]
_C110 = [[3, 0], [3, 3], [3, 4], [3, 17]]
PUBLIC_AUX = {
    ("resnet32", 8, 0): [_A32, _A32, _B32, _C32, _C32, [[3, 2], [3, 3], [3, 4]],
                         [[3, 3], [3, 4]]],
    ("resnet32", 16, 1): [_A32, _A32, _B32, _A32, _B32, *[_C32] * 5, [[3, 1], [3, 2], [3, 4]],
                          [[3, 2], [3, 3], [3, 4]], [[3, 3], [3, 4]], [[3, 4]]],
    ("resnet110", 32, 0): [*[_A110] * 11, *[_B110] * 10, _C110, *[[[3, 8], [3, 17]]] * 4,
                           *[[[3, 14], [3, 17]]] * 2, [[3, 15], [3, 17]], [[3, 16], [3, 17]],
                           [[3, 17]]],
    ("resnet110", 55, 1): [*[_A110] * 18, *[_B110] * 17, _C110, *[[[3, 8], [3, 17]]] * 7,
                           *[[[3, 14], [3, 17]]] * 4, *[[[3, 15], [3, 17]]] * 2,
                           *[[[3, 16], [3, 17]]] * 3, [[3, 17]]],
}


@pytest.mark.parametrize("model,K,first", list(PUBLIC_AUX), ids=lambda v: str(v))
def test_public_leap_tables(model, K, first):
    want = {first + i: [unit(model, s, b) for s, b in row]
            for i, row in enumerate(PUBLIC_AUX[(model, K, first)])}
    assert len(want) == K - 1 - first  # a row for every module but the last (and the stem)
    split = "public" if K == 32 else "even"
    rule, net, _ = build("lam(linear, leaps=public)", model, K, CIFAR, split)  # k=1
    got = dict(zip(rule.cascades, rule.blocks))
    assert {m: got[m] for m in want} == want
    for m, units in want.items():  # every copy lies after its module
        assert min(units) > net.unit_ranges[m][-1]
    rule, _, _ = build("mlaan(linear, leaps=public)", model, K, CIFAR, split)  # k=3
    assert rule.cascades == list(range(2, K - 1))
    assert rule.blocks == [want[m] for m in rule.cascades]


def test_public_leaps_elsewhere_are_one_clear_error():
    with pytest.raises(UserError, match=r"no leap table .*'resnet32' at K=10.*resnet32 K=8, "
                                        r"resnet32 K=16, resnet110 K=32, resnet110 K=55"):
        build("mlaan(linear, leaps=public)", K=10)
    with pytest.raises(UserError, match="--split public"):
        build("mlaan(linear, leaps=public)", "resnet110", 32)  # the even split
    with pytest.raises(UserError, match="shape templates"):
        build("mlaan(linear, leaps=public)", "resnet34", 17,
              DataInfo(10, (3, 64, 64), (0.5,) * 3, (0.5,) * 3))


def test_a_leap_table_naming_a_missing_module_is_an_error():
    with pytest.raises(UserError, match="names module 99, but K=16 has modules 0..15"):
        build("mlaan(linear, leaps='99:1')")
    with pytest.raises(UserError, match="names module 15"):  # the last module has no LAM
        build("mlaan(linear, leaps='15:1')")
    with pytest.raises(UserError, match="module 0, which ends no cascade.*modules 2..14"):
        build("mlaan(linear, leaps='0:6')")
    rule, _, _ = build("mlaan(linear, leaps='0:6', short_cascades=true)")
    assert rule.blocks[0] == [6]


# ------------------------------------------------------------------ splits by name

# the public code's "last block of each module" lists (config2.py), final entry left out
PUBLIC_ENDS = {
    ("resnet32", 2): [[2, 1]],
    ("resnet32", 3): [[1, 4], [2, 4]],
    ("resnet32", 4): [[1, 2], [2, 1], [3, 0]],
    ("resnet32", 8): [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
    ("resnet110", 2): [[2, 8]],
    ("resnet110", 3): [[1, 17], [2, 17]],
    ("resnet110", 4): [[1, 11], [2, 7], [3, 3]],
    ("resnet110", 8): [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
    ("resnet110", 16): [[1, 1], [1, 4], [1, 7], [1, 10], [1, 13], [1, 16], [2, 1], [2, 4],
                        [2, 7], [2, 11], [2, 15], [3, 1], [3, 5], [3, 9], [3, 13]],
    ("resnet110", 32): [[1, 1], [1, 2], [1, 4], [1, 5], [1, 7], [1, 9], [1, 11], [1, 13],
                        [1, 14], [1, 16], [1, 17], [2, 1], [2, 2], [2, 4], [2, 5], [2, 7],
                        [2, 9], [2, 11], [2, 13], [2, 14], [2, 16], [2, 17], [3, 1], [3, 3],
                        [3, 4], [3, 6], [3, 7], [3, 9], [3, 11], [3, 13], [3, 15]],
}


def test_public_split_tables():
    units = {"resnet32": 16, "resnet110": 55}
    for (model, K), ends in PUBLIC_ENDS.items():
        assert PUBLIC_SPLITS[units[model]][K] == tuple(unit(model, s, b) + 1 for s, b in ends)
    for n in units.values():  # the code's one-block-per-module K, the stem its own module
        assert PUBLIC_SPLITS[n][n] == tuple(range(1, n))
    sizes = [len(r) for r in CifarResNetSplitter().split(
        resnet110(), 32, (3, 32, 32), "public").unit_ranges]
    assert sizes == [3, 1, 2, 1, 2, 2, 2, 2, 1, 2, 1] + [2, 1, 2, 1, 2, 2, 2, 2, 1, 2, 1] \
        + [2, 2, 1, 2, 1, 2, 2, 2, 2, 2]  # the stem rides with module 0


@pytest.mark.parametrize("model,K", [("resnet110", 32), ("resnet32", 3)])
def test_public_split_forward_equals_backbone(model, K):
    torch.manual_seed(0)
    backbone = (resnet32 if model == "resnet32" else resnet110)().eval()
    net = CifarResNetSplitter().split(backbone, K, (3, 32, 32), policy="public")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), backbone(x))
    assert net.split == "public" and net.cuts == list(PUBLIC_SPLITS[len(net.units)][K])


def test_explicit_cut_list():
    rule = expr.build("linear")
    net = build_network("resnet32", 4, rule, 10, INFO.input_shape, "cuts:3,5,8")
    assert net.cuts == [3, 5, 8] and [len(r) for r in net.unit_ranges] == [3, 2, 3, 8]
    splitter = CifarResNetSplitter()
    assert splitter.implied_k("cuts:3,5,8", 16) == 4 and splitter.implied_k("even", 16) is None
    with pytest.raises(UserError, match=r"makes 4 modules, not K=16; give K=4 \(--k 4\)"):
        build_network("resnet32", 16, rule, 10, INFO.input_shape, "cuts:3,5,8")
    for bad in ("cuts:5,3", "cuts:3,3", "cuts:0,3", "cuts:3,16", "cuts:-1"):
        with pytest.raises(UserError, match="strictly increasing and lie in 1..15"):
            build_network("resnet32", 3, rule, 10, INFO.input_shape, bad)
    with pytest.raises(UserError, match="expected unit indices"):
        build_network("resnet32", 3, rule, 10, INFO.input_shape, "cuts:3,x")
    with pytest.raises(UserError, match="split 'public' has no cut points for K=5.*resnet32 "
                                        "K=2, 3, 4, 8, 16; resnet110 K=2, 3, 4, 8, 16, 32, 55"):
        build_network("resnet32", 5, rule, 10, INFO.input_shape, "public")
    with pytest.raises(UserError, match="valid: even, balanced, public, cuts:"):
        build_network("resnet32", 5, rule, 10, INFO.input_shape, "greedy")


def test_a_cut_list_without_k_infers_k():
    net = build_network("resnet32", None, expr.build("linear"), 10, INFO.input_shape,
                        "cuts:3,5,8")
    assert net.k == 4


# ------------------------------------------------------------------ InfoPro by dataset

STL = DataInfo(10, (3, 96, 96), (0.5,) * 3, (0.5,) * 3,
               ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                "truck"))
SVHN = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, tuple(str(d) for d in range(10)))


def test_dataset_is_read_from_the_data_info():
    assert identify_dataset(STL) == "stl10" and identify_dataset(SVHN) == "svhn"
    assert identify_dataset(CIFAR) == "cifar10"
    digits = DataInfo(10, (3, 32, 32), (0.3,) * 3, (0.4,) * 3, SVHN.class_names)
    assert identify_dataset(digits) == "cifar10"  # InfoPro has no settings for it
    named = types.SimpleNamespace(name="svhn-shards", input_shape=(3, 32, 32), class_names=(),
                                  mean=(0.1,) * 3, std=(0.2,) * 3)
    assert identify_dataset(named) == "svhn"  # a name, where DataInfo carries one, wins


def ends(rule, K):
    got = rule.ramp_ends(K)
    return tuple(got[key] for key in ("ixx_1", "ixx_2", "ixy_1", "ixy_2"))


@pytest.mark.parametrize("model,K,info,split,want", [
    ("resnet110", 16, STL, "even", (20, 10, 0.5, 0.1)),
    ("resnet110", 4, STL, "even", (20, 5, 0.2, 2)),
    ("resnet110", 8, SVHN, "even", (5, 0.5, 0, 2)),
    ("resnet110", 2, SVHN, "even", (1, 1, 0.1, 0.1)),
    ("resnet110", 55, SVHN, "even", (5, 0.5, 0.2, 1)),      # nearest published K
    ("resnet32", 16, STL, "even", (20, 10, 0.5, 0.1)),      # no R32 STL-10 row: R110's
    ("resnet32", 8, SVHN, "even", (5, 0.5, 0, 2)),          # no R32 SVHN row: R110's
    ("resnet32", 16, CIFAR, "even", (5, 0.2, 0.05, 0.5)),
    ("resnet110", 3, STL, "balanced", (20, 5, 0.5, 2)),     # InfoPro* on STL-10
    ("resnet110", 3, SVHN, "balanced", (5, 0.5, 0, 1)),     # no InfoPro* SVHN row
])
def test_infopro_defaults_by_dataset(model, K, info, split, want):
    rule, net, _ = build("infopro", model, K, info, split)
    assert ends(rule, net.k) == want


def test_infopro_star_on_stl10_takes_its_own_cuts():
    assert DEFAULTS["stl10"]["resnet110*"][3] == (20, 5, 0.5, 2)
    _, net, _ = build("infopro", "resnet110", 3, STL, "balanced")
    assert net.cuts == [10, 21]  # [[1, 8], [2, 1]]: blocks 9 / 11 / 34
    _, net, _ = build("infopro", "resnet110", 3, CIFAR, "balanced")
    assert net.cuts == [11, 22]


def test_public_mlaan_infopro_settings_run():
    text = "infopro(loss=ce, ixx_1=5, ixx_2=0, ixy_1=0.5, ixy_2=0)"
    with pytest.raises(UserError, match="module 4 of 6 gets ixx=0 and ixy=0"):
        build(text, K=6)  # alone, nothing would train module K-2
    rule, net, aux = build(f"mlaan({text}, k=3)", K=6)
    empty = rule.heads[4]  # module K-2: both weights 0, an empty head with loss 0
    assert empty.decoder is None and empty.classifier is None and n_params(empty) == 0
    assert rule.heads[3].classifier is not None and rule.heads[3].decoder is not None
    result = rule.train_step(PlainContext(), net, torch.rand(4, *INFO.input_shape),
                             torch.arange(4))
    assert torch.isfinite(result.loss) and float(result.local_losses[-1]) == 0.0
    grads = [q.grad for q in net.local_modules[4].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
