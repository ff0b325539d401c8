"""MLAAN: the single-forward step against a naive oracle, the reach of every loss, EMA twins."""

import copy

import helpers
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlaan_reference import naive_step
from torch import nn

from localearn import expr
from localearn.build import build_run
from localearn.config import make_config
from localearn.engine import fit
from localearn.errors import UserError
from localearn.interfaces import PlainContext

UNITS = {"resnet32": 16, "resnet110": 55}


def build(rule_text: str, model: str, K: int, seed: int = 0):
    return helpers.build(rule_text, K, model, seed)


def grads(*modules):
    return [p.grad.clone() if p.grad is not None else None
            for m in modules for p in m.parameters()]


def with_naive_twin(text: str, model: str, K: int):
    """The rule, network and aux, and a reference rule and network holding copies of the same
    weights, for `naive_step`."""
    rule, net, aux = build(text, model, K)
    ref_net, ref_aux = copy.deepcopy(net), copy.deepcopy(aux)
    ref_rule = expr.build(text)
    ref_rule.setup(ref_net, helpers.INFO)
    ref_rule.heads, ref_rule.cascade_heads = ref_aux["heads"], ref_aux["cascade_heads"]
    ref_rule.copies, ref_rule.twins = ref_aux["copies"], ref_aux["twins"]
    return (rule, net, aux), (ref_rule, ref_net, ref_aux)


def assert_same_grads(got, want) -> int:
    """Same tensors present, each equal up to summation order relative to its scale; returns
    how many were compared."""
    compared = 0
    for g, r in zip(got, want, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            assert (g - r).abs().max() <= 1e-5 * r.abs().max() + 1e-7
            compared += 1
    return compared


@settings(max_examples=10, deadline=None)
@given(model=st.sampled_from(sorted(UNITS)), data=st.data())
def test_single_forward_step_equals_naive_oracle(model, data):
    K = data.draw(st.integers(1, 8), label="K")
    k = data.draw(st.integers(1, 4), label="k")
    p = data.draw(st.integers(0, 4), label="p")
    which = data.draw(st.sampled_from(["first", "all"]), label="ema_blocks")
    fuse = data.draw(st.booleans(), label="fuse")
    recompute = data.draw(st.booleans(), label="recompute")
    short = data.draw(st.booleans(), label="short_cascades")
    leap = data.draw(st.sampled_from(["largest", "all", "off"]), label="checkpoint_leap")
    text = (f"mlaan(dgl, k={k}, p={p}, ema_blocks={which}, fuse={fuse}, recompute={recompute}, "
            f"short_cascades={short}, checkpoint_leap={leap})")
    (rule, net, aux), (ref_rule, ref_net, ref_aux) = with_naive_twin(text, model, K)
    images, targets = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    rule.train_step(PlainContext(), net, images, targets)
    naive_step(ref_rule, ref_net, images, targets)
    assert_same_grads(grads(net, aux), grads(ref_net, ref_aux))


@pytest.mark.parametrize("text", ["mlaan(infopro, k=2, p=2)", "mlaan(infopro(loss=ce), k=3)"])
def test_over_infopro_equals_naive_oracle(text):
    # InfoPro's heads also read the input images (reconstruction target)
    (rule, net, aux), (ref_rule, ref_net, ref_aux) = with_naive_twin(text, "resnet32", 5)
    images, targets = torch.rand(8, 3, 32, 32), torch.arange(8) % 3
    rule.train_step(PlainContext(), net, images, targets)
    naive_step(ref_rule, ref_net, images, targets)
    assert assert_same_grads(grads(net, aux), grads(ref_net, ref_aux)) > 0


def test_recompute_keeps_batchnorm_statistics_and_matches_the_kept_graphs():
    # the same step with and without recompute: equal gradients and equal BN running stats
    # (a recomputed forward must not update them a second time)
    plain, net, aux = build("mlaan(dgl, k=3, p=2)", "resnet32", 8)
    again, net2, aux2 = build("mlaan(dgl, k=3, p=2, recompute=true)", "resnet32", 8)
    images, targets = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    plain.train_step(PlainContext(), net, images, targets)
    again.train_step(PlainContext(), net2, images, targets)
    assert any("@ module 0" in t for t in again.trace[again.trace.index("cascade 2"):])
    assert_same_grads(grads(net, aux), grads(net2, aux2))
    for b, c in zip(net.buffers(), net2.buffers()):
        assert torch.equal(b, c)


def test_checkpointed_first_leaps_are_exact_and_lower_the_peak():
    # the same step with every first leap checkpointed and with none: bitwise the same
    # gradients and BatchNorm statistics (the copies' and twins' too: a leap run again for its
    # backward puts its buffers back), and a lower peak of live tensors
    from functools import partial

    from localearn.measure import cpu_peak

    images, targets = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    peak, got, stats = {}, {}, {}
    for mode in ("all", "off"):
        rule, net, aux = build(f"mlaan(dgl, checkpoint_leap={mode})", "resnet32", 8)
        _, peak[mode] = cpu_peak(partial(rule.train_step, PlainContext(), net, images, targets))
        got[mode] = grads(net, aux)
        stats[mode] = [b.clone() for b in [*net.buffers(), *aux.buffers()]]
    assert all((a is None and b is None) or torch.equal(a, b)
               for a, b in zip(got["all"], got["off"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(stats["all"], stats["off"], strict=True))
    assert peak["all"] < 0.95 * peak["off"], peak


def test_checkpoint_leap_picks_the_cascades_beside_the_largest_graphs():
    # ResNet-32 at K=16: modules 0..5 (the stem and stage 1) give the largest outputs, and the
    # cascades that reach one of them (depth 3) end at modules 2..7
    def chosen(text):
        rule, _, _ = build(text, "resnet32", 16)
        return sorted(rule.cascades[c] for c in rule._rerun_first)

    assert chosen("mlaan(dgl)") == list(range(2, 8))
    assert chosen("mlaan(dgl, checkpoint_leap=all)") == list(range(2, 15))
    assert chosen("mlaan(dgl, checkpoint_leap=off)") == []
    with pytest.raises(UserError, match="checkpoint_leap"):
        expr.build("mlaan(dgl, checkpoint_leap=some)")


def traced_reach(rule, net, aux):
    """Which parameters each loss's backward passes touch, by hooks on every parameter."""
    touched: dict[str, set[int]] = {}
    names = {id(p): n for n, p in [*net.named_parameters(), *aux.named_parameters()]}
    for p in [*net.parameters(), *aux.parameters()]:
        if p.requires_grad:
            p.register_hook(lambda g, p=p: touched.setdefault(
                rule.trace[-1].split(" @")[0], set()).add(id(p)))
    rule.train_step(PlainContext(), net, torch.randn(4, 3, 32, 32), torch.arange(4))
    return touched, names


@pytest.mark.parametrize("K,k,recompute", [(6, 3, False), (5, 2, False), (16, 3, False),
                                           (4, 5, False), (6, 3, True)])
def test_each_loss_reaches_exactly_its_parameters(K, k, recompute):
    # the first reading (a cascade at every module); the paper's default: tests/test_faithful.py
    rule, net, aux = build(f"mlaan(dgl, k={k}, fuse=false, recompute={recompute}, "
                           "short_cascades=true)", "resnet32", K)
    touched, _ = traced_reach(rule, net, aux)

    def ids(*mods):
        return {id(p) for m in mods for p in m.parameters()}

    mods = net.local_modules
    for i in range(K - 1):
        assert touched[f"independent {i}"] == ids(mods[i], rule.heads[i])
        span = [mods[j] for j in range(max(0, i - k + 1), i + 1)]
        assert touched[f"cascade {i}"] == ids(*span, rule.copies[i], rule.cascade_heads[i])
    assert touched["final"] == ids(*mods[max(0, K - k):])
    twin_ids = ids(rule.twins)
    assert twin_ids and not any(twin_ids & t for t in touched.values())


def test_twins_follow_the_real_blocks_by_ema_and_get_no_gradient():
    rule, net, aux = build("mlaan(dgl, ema=0.9, ema_blocks=all)", "resnet32", 16)
    before = {b: copy.deepcopy(t.state_dict()) for b, t in rule.twins.items()}
    # every module's LAM has a twin of its first block; twins are shared, one per real block
    assert {str(blocks[0]) for blocks in rule.blocks} <= set(rule.twins)
    params = [p for p in [*net.parameters(), *aux.parameters()] if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    rule.train_step(PlainContext(), net, torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    opt.step()
    rule.after_step()
    for b, twin in rule.twins.items():
        real = net.units[int(b)]
        assert all(p.grad is None for p in twin.parameters())
        for (name, t), r in zip(twin.named_parameters(), real.parameters()):
            old = before[b][name]
            torch.testing.assert_close(t, 0.9 * old + 0.1 * r.detach())
            assert not torch.equal(t, old), f"twin {b}.{name} did not move"


def test_leap_policy_and_parameter_roles():
    rule, net, aux = build("mlaan(dgl, short_cascades=true)", "resnet32", 16)
    # module 0 is the stem: the first block of stage 2 and 3 (units 6, 11), the final unit
    # 15 and one evenly spaced unit; the last LAM holds the final block alone
    assert rule.blocks[0][-1] == 15 and {6, 11} <= set(rule.blocks[0]) and len(rule.blocks[0]) == 4
    assert rule.blocks[-1] == [15]
    groups = rule.aux_groups(aux)
    assert set(groups) == {"heads", "copies", "twins"}
    n_twins = sum(p.numel() for p in groups["twins"].parameters())
    first_blocks = {blocks[0] for blocks in rule.blocks}
    assert n_twins == sum(p.numel() for b in first_blocks for p in net.units[b].parameters())


def test_options_and_errors():
    assert expr.build("mlaan(dgl)").k == 3
    rule = expr.build("mlaan(dgl, k=2, wx=0.01, wy=0.99, ema=0.99, p=3, ema_blocks=all)")
    assert (rule.k, rule.wx, rule.wy, rule.ema, rule.p, rule.ema_blocks) == \
        (2, 0.01, 0.99, 0.99, 3, "all")
    assert expr.build("mlm(dgl)").p == 0 and expr.build("lam(dgl)").k == 1
    with pytest.raises(UserError, match="has no auxiliary heads"):
        expr.build("mlaan(bp)")
    with pytest.raises(UserError, match="ema_blocks"):
        expr.build("mlaan(dgl, ema_blocks=some)")
    with pytest.raises(UserError, match="k must be at least 1"):
        expr.build("mlaan(dgl, k=0)")
    with pytest.raises(UserError, match="cannot follow"):
        build("mlaan(dgl, leaps='0:12', short_cascades=true)", "resnet32", 16)
    rule, _, _ = build("mlaan(dgl, leaps='0:6,11; 3:6,11,15', short_cascades=true)",
                       "resnet32", 16)
    assert rule.blocks[0] == [6, 11] and rule.blocks[3] == [6, 11, 15]


@pytest.mark.slow
@pytest.mark.parametrize("rule,K,epochs", [("mlaan(dgl)", 4, 3)])
def test_trains_on_digits_above_90_percent(rule, K, epochs, tmp_path):
    # ResNet-32, the embedded digits set, batch 64 (K=4 where LAMs make K=16 slow on 2 CPU
    # cores). Measured: mlaan(dgl) 10.2%, 82.0%, 98.0% after epochs 1-3 at K=4; at K=8 in
    # 3-epoch runs, mlaan(dgl) 98.0%, mlm(dgl) 94.4%, lam(dgl) 91.1%. The
    # ablations mlm and lam run parts of mlaan's step, whose gradients the float64 oracles
    # check exactly; their training runs (about 4.5 CPU-minutes) are left to the results.
    cfg = make_config(rule=rule, k=K, epochs=epochs, batch_size=64, lr=0.05, progress=False,
                      output_dir=tmp_path)
    result = fit(cfg)
    assert result.test_acc > 0.90, result.history


def test_recompute_draws_the_same_dropout_masks():
    # a module that draws random numbers (dropout after unit 3) must see the same masks when
    # it is run again for a backward pass, or its gradients would belong to another forward
    grads_of = {}
    for flag in (False, True):
        rule, net, aux = build(f"mlaan(dgl, k=3, p=1, recompute={flag})", "resnet32", 6)
        net.units[3].register_forward_hook(
            lambda m, i, out: nn.functional.dropout(out, 0.5, training=True))
        torch.manual_seed(1)
        rule.train_step(PlainContext(), net, torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
        grads_of[flag] = grads(net, aux)
    assert_same_grads(grads_of[True], grads_of[False])


def test_recompute_lowers_the_peak_of_live_tensors():
    # same step, same data: recompute keeps no module graph and checkpoints the LAM blocks
    from functools import partial

    from localearn.measure import cpu_peak

    images, targets = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    peaks = {}
    for flag in (False, True):
        rule, net, _ = build(f"mlaan(dgl, recompute={flag})", "resnet32", 6)
        _, peaks[flag] = cpu_peak(partial(rule.train_step, PlainContext(), net, images, targets))
    assert peaks[True] < 0.8 * peaks[False], peaks


# ------------------------------------------------------------------ which twins move, and when


def engine_step(text: str, K: int, ema: float = 0.9):
    """Two steps of the engine's real `Step` (zero_grad, the rule, the optimizer step,
    ``after_step``); the run, and the twins' states and their real blocks' parameters before
    the second (after the first, twins and real blocks differ: a twin equal to its block would
    not show an update)."""
    run = build_run(make_config(rule=text, k=K, device="cpu", lr=0.1), info=helpers.INFO)
    rule = run.rule
    run.step(*helpers.batch(seed=2))
    twins = {key: copy.deepcopy(t.state_dict()) for key, t in rule.twins.items()}
    reals = {key: [q.detach().clone() for q in rule.units[rule.twin_blocks[key]].parameters()]
             for key in rule.twins}
    run.step(*helpers.batch())
    return run, twins, reals


def expect_moved(rule, key, before, real_params, ema, buffers_from=None):
    twin = rule.twins[key]
    for (name, t), r in zip(twin.named_parameters(), real_params, strict=True):
        torch.testing.assert_close(t, ema * before[key][name] + (1 - ema) * r)
    if buffers_from is not None:  # else the twin's own forwards move its BN statistics
        for b, r in zip(twin.buffers(), buffers_from.buffers(), strict=True):
            torch.testing.assert_close(b, r)


def test_twins_public_last_moves_only_the_last_lams_twin_before_the_step():
    # the public CIFAR code: only module K-2's twin moves, from the weights before the
    # optimizer step, parameters only; every other twin keeps its initial weights
    run, before, reals = engine_step("mlaan(dgl, ema=0.9, twins=public_last)", 8)
    rule = run.rule
    last = rule.twin_keys[-1][0]
    assert rule.cascades[-1] == 6 and last == str(rule.blocks[-1][0])
    expect_moved(rule, last, before, reals[last], 0.9)
    after = [q.detach() for q in rule.units[rule.twin_blocks[last]].parameters()]
    assert any(not torch.equal(a, r) for a, r in zip(after, reals[last]))  # the step moved it
    for key, twin in rule.twins.items():
        if key != last:  # its parameters (its BN statistics follow its own forwards)
            for name, t in twin.named_parameters():
                assert torch.equal(t, before[key][name]), f"twin {key}.{name} moved"


def test_twins_public_last_gives_the_last_lam_its_own_twin_when_shared():
    # p=1, k=1: modules 11..14 of ResNet-32 K=16 all copy the final unit 15; the public code
    # holds one twin per module, so the last LAM's moves while the others' stay put
    run, before, reals = engine_step("lam(linear, p=1, ema=0.9, twins=public_last)", 16)
    rule = run.rule
    assert [rule.blocks[c] for c in range(11, 15)] == [[15]] * 4
    assert rule.twin_keys[-1] == ["15_last"] and rule.twin_keys[-2] == ["15"]
    expect_moved(rule, "15_last", before, reals["15_last"], 0.9)
    for name, t in rule.twins["15"].named_parameters():
        assert torch.equal(t, before["15"][name])
    paper = build_run(make_config(rule="lam(linear, p=1)", k=16, device="cpu"),
                      info=helpers.INFO).rule
    assert "15_last" not in paper.twins  # the default shares one twin per real block


def test_twins_public_all_moves_every_twin_before_the_step():
    run, before, reals = engine_step("mlaan(dgl, ema=0.9, ema_blocks=all, twins=public_all)", 8)
    rule = run.rule
    assert len(rule.twins) > 2
    for key in rule.twins:
        expect_moved(rule, key, before, reals[key], 0.9)


def test_twins_paper_moves_every_twin_after_the_step():
    run, before, _ = engine_step("mlaan(dgl, ema=0.9)", 8)
    rule = run.rule
    for key in rule.twins:
        real = rule.units[rule.twin_blocks[key]]
        expect_moved(rule, key, before, [q.detach() for q in real.parameters()], 0.9,
                     buffers_from=real)


def test_twins_option_is_checked():
    assert expr.build("mlaan(dgl)").twin_mode == "paper"
    assert expr.build("lam(dgl, twins=public_all)").twin_mode == "public_all"
    with pytest.raises(UserError, match="twins"):
        expr.build("mlaan(dgl, twins=public)")
