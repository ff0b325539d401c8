"""AugLocal: sampled layers and pyramidal depths against the paper's equations, the reach of
every loss, one step against a naive recomputation, resume, roles, and learning on digits."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from localearn import expr
from localearn.build import build_run
from localearn.cli import main
from localearn.config import make_config
from localearn.engine import Trainer, checkpoint, fit
from localearn.errors import UserError
from localearn.interfaces import DataInfo, PlainContext
from localearn.measure import BenchReport, role_bytes
from localearn.models.cifar_resnet import BasicBlock

INFO = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def build(rule_text: str, model: str = "resnet32", K: int = 16, seed: int = 0):
    run = build_run(make_config(rule=rule_text, model=model, k=K, seed=seed, device="cpu"),
                    info=INFO)
    return run.rule, run.net, run.aux


# ------------------------------------------------------------- the paper's equations, naively
def ref_layers(layer: int, n_units: int, depth: int) -> list[int]:
    """Uniform sampling of the layers after layer l (0-based, N layers): every later layer
    when there are at most `depth`, else round(l + (N - l - 1) * j / depth), j = 1..depth."""
    if depth >= n_units - 1 - layer:
        return list(range(layer + 1, n_units))
    return [round(layer + (n_units - layer - 1) * j / depth) for j in range(1, depth + 1)]


def ref_depth(d: int, tau: float, i: int, k_local: int) -> int:
    """Pyramidal depth of hidden module i (0-based) when K' modules train locally (the last
    one by the output loss): max(1, round(d (1 - tau i / (K'-2)) + tau i / (K'-2)))."""
    if k_local == 2:
        return d
    r = i * tau / (k_local - 2)
    return max(1, round(d * (1 - r) + r))


def block_params(cin: int, cout: int) -> int:
    """A BasicBlock's parameters: two 3x3 convolutions and two BNs, plus a 1x1 convolution
    and BN on the shortcut when the width changes (every stride-2 block changes it here)."""
    n = 9 * cin * cout + 9 * cout * cout + 4 * cout
    return n + (cin * cout + 2 * cout if cin != cout else 0)


@pytest.mark.parametrize("model,K,d,tau,merge", [
    ("resnet32", 16, 2, 0.5, True), ("resnet110", 55, 3, 0.5, True),
    ("resnet32", 16, 5, 1.0, False), ("resnet32", 6, 3, 0.25, True),
    ("resnet32", 5, 1, 0.0, False)])
def test_plan_equals_the_paper_equations(model, K, d, tau, merge):
    rule, net, _ = build(f"auglocal(d={d}, tau={tau}, merge_tail={merge})", model, K)
    k_local = K - d if merge else K  # K': the gradient-isolated modules
    want = []
    for i in range(k_local - 1):
        depth = ref_depth(d, tau, i, k_local)
        want.append((ref_layers(net.unit_ranges[i][-1], len(net.units), depth), depth))
    assert rule.plan == want


def test_the_published_configurations():
    # ResNet-32 "K=16", d=2: 13 local modules (the stem and blocks 1-12), all of depth 2
    # (1.5 rounds to 2); blocks 13-15 and the classifier train by the output loss
    rule, net, _ = build("auglocal(d=2)", "resnet32", 16)
    assert [depth for _, depth in rule.plan] == [2] * 13
    assert rule.plan[0][0] == [8, 15] and rule.plan[12][0] == [14, 15]
    # ResNet-110 "K=55", d=3: 51 local modules, depth 3 for modules 0-24, then 2
    rule, net, _ = build("auglocal(d=3)", "resnet110", 55)
    assert [depth for _, depth in rule.plan] == [3] * 25 + [2] * 26
    assert rule.plan[0][0] == [18, 36, 54] and rule.plan[40][0] == [47, 54]


def test_head_shapes_and_parameter_count():
    rule, net, aux = build("auglocal(d=2)", "resnet32", 16)
    head = aux[0]  # the stem's: blocks like units 8 (32 ch, 16x16) and 15 (64 ch, 8x8)
    assert [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0])
            for b in head.blocks] == [(16, 32, 2), (32, 64, 2)]
    assert all(isinstance(b, BasicBlock) for h in aux for b in h.blocks)
    assert head.blocks(torch.zeros(2, 16, 32, 32)).shape == (2, 64, 8, 8)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in aux.modules())  # depth 2 everywhere
    total = 0
    for (layers, _), r in zip(rule.plan, net.unit_ranges):
        c = net.unit_shapes[r[-1]][0]
        for u in layers:
            total += block_params(c, net.unit_shapes[u][0])
            c = net.unit_shapes[u][0]
        total += 10 * c + 10
    assert sum(p.numel() for p in aux.parameters()) == total
    # depth 1: a block skipping a stage gets one stride 2, and a BN1d before the classifier
    _, _, aux = build("auglocal(d=1)", "resnet32", 16)
    assert aux[0].blocks(torch.zeros(2, 16, 32, 32)).shape == (2, 64, 16, 16)
    assert isinstance(aux[0].classifier[2], nn.BatchNorm1d)


# ------------------------------------------------------------------------ gradient isolation
class RecordingContext(PlainContext):
    """Back-propagates as PlainContext and records which loss each parameter hook fires in
    and which parameters are announced after each backward."""

    def __init__(self) -> None:
        self.calls = 0
        self.announced: list[set[int]] = []

    def backward(self, loss, *, retain_graph=False):
        self.calls += 1
        super().backward(loss, retain_graph=retain_graph)

    def grads_ready(self, params):
        self.announced.append({id(p) for p in params})


@pytest.mark.parametrize("K,text,n_local", [(16, "auglocal(d=2)", 13),
                                            (6, "auglocal(d=1, merge_tail=false)", 5),
                                            (6, "auglocal(d=3, tau=1.0)", 2)])
def test_each_loss_reaches_exactly_its_parameters(K, text, n_local):
    rule, net, aux = build(text, "resnet32", K)
    ctx = RecordingContext()
    touched: dict[int, set[int]] = {}
    for p in [*net.parameters(), *aux.parameters()]:
        p.register_hook(lambda g, p=p: touched.setdefault(ctx.calls, set()).add(id(p)))
    rule.train_step(ctx, net, torch.randn(4, 3, 32, 32), torch.arange(4))

    def ids(*mods):
        return {id(p) for m in mods for p in m.parameters()}

    mods = net.local_modules
    assert len(aux) == n_local and ctx.calls == n_local + 1
    want = [ids(mods[i], aux[i]) for i in range(n_local)] + [ids(*mods[n_local:])]
    assert [touched[c] for c in range(1, n_local + 2)] == want
    assert ctx.announced == want  # each group announced once its loss has back-propagated


def test_one_step_equals_a_naive_recomputation():
    # the paper's update: module i < n moves along the gradient of its own local loss
    # CE(g_i(h_i)) with respect to its own and g_i's parameters, the tail (modules n..K-1)
    # along that of the output loss; computed here on one end-to-end graph with
    # torch.autograd.grad, restricted to those parameters, with no detach anywhere
    rule, net, aux = build("auglocal(d=2, tau=1.0)", "resnet32", 8)
    ref_net, ref_aux = copy.deepcopy(net), copy.deepcopy(aux)
    torch.manual_seed(1)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    rule.train_step(PlainContext(), net, images, targets)

    n = len(ref_aux)
    h, want = images, {}
    for i, module in enumerate(ref_net.local_modules):
        h = module(h)
        if i < n:
            params = [*module.parameters(), *ref_aux[i].parameters()]
            loss = nn.functional.cross_entropy(ref_aux[i](h), targets)
            want.update(zip(map(id, params), torch.autograd.grad(loss, params,
                                                                  retain_graph=True)))
    tail = [p for m in ref_net.local_modules[n:] for p in m.parameters()]
    loss = nn.functional.cross_entropy(h, targets)
    want.update(zip(map(id, tail), torch.autograd.grad(loss, tail)))

    compared = 0
    for (name, p), r in zip([*net.named_parameters(), *aux.named_parameters()],
                            [*ref_net.parameters(), *ref_aux.parameters()], strict=True):
        assert p.grad is not None, name
        g = want[id(r)]
        assert (p.grad - g).abs().max() <= 1e-5 * g.abs().max() + 1e-7, name
        compared += 1
    assert compared == len(want) > 100
    for a, b in zip([*net.buffers(), *aux.buffers()], [*ref_net.buffers(), *ref_aux.buffers()]):
        assert torch.equal(a, b)  # one forward each: the same BatchNorm statistics


# ------------------------------------------------------------------------- options and errors
def test_options_and_errors(capsys):
    rule = expr.build("auglocal")
    assert (rule.d, rule.tau, rule.merge_tail) == (2, 0.5, True)
    rule = expr.build("auglocal(d=4, tau=0, merge_tail=false)")
    assert (rule.d, rule.tau, rule.merge_tail) == (4, 0.0, False)
    for text, message in [("auglocal(d=0)", "d must be at least 1"),
                          ("auglocal(tau=1.5)", r"tau must lie in \[0, 1\]"),
                          ("auglocal(d=2.5)", "bad value 2.5 for option 'd'"),
                          ("auglocal(tau=wide)", "bad value 'wide' for option 'tau'"),
                          ("auglocal(width=2)", "unknown option 'width'")]:
        with pytest.raises(UserError, match=message):
            expr.build(text)
    with pytest.raises(UserError, match="K must be at least d\\+2=5 \\(got K=4\\)"):
        build("auglocal(d=3)", "resnet32", 4)
    build("auglocal(d=3, merge_tail=false)", "resnet32", 4)  # all four modules local: fine
    code = main(["fit", "--rule", "auglocal(d=0)", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("localearn: error: ") and err.count("\n") == 1, err
    assert "d must be at least 1" in err


def test_timm_resnets_get_blocks_of_their_own_kind():
    from localearn_plugins.auglocal import make_block
    from timm.models.resnet import BasicBlock as TimmBasic
    from timm.models.resnet import Bottleneck

    rule, net, aux = build("auglocal(d=2)", "resnet34", 17)  # 14 local modules
    assert len(aux) == 14 and all(isinstance(b, TimmBasic) for h in aux for b in h.blocks)
    assert rule.plan[0] == ([8, 16], 2)  # stem: blocks shaped like units 8 and 16 (the last)
    result = rule.train_step(PlainContext(), net, torch.randn(2, 3, 32, 32), torch.arange(2))
    assert torch.isfinite(result.loss) and len(result.local_losses) == 14
    assert all(p.grad is not None for p in net.parameters())
    like = Bottleneck(256, 64)  # ResNet-101/152's kind: 256 -> 512 channels, stride 2
    block = make_block(like, 256, 512, 2)
    assert isinstance(block, Bottleneck)
    assert block(torch.zeros(1, 256, 8, 8)).shape == (1, 512, 4, 4)


def test_other_backbones_are_refused_in_one_line():
    rule = expr.build("auglocal")
    from localearn.build import build_network

    with pytest.raises(UserError, match="or copies ViT blocks; convnext_tiny has Sequential units"):
        build_network("convnext_tiny", 8, rule, 10, (3, 32, 32))


# --------------------------------------------------------------------- resume, memory, bench
def test_checkpoint_resume_is_exact(tmp_path):
    # 64 digits in batches of 16: 4 steps an epoch, 8 in all; resume from step 3 (mid-epoch)
    def cfg(out, **kw):
        return make_config(rule="auglocal(d=1)", k=4, train_limit=64, test_limit=32,
                           batch_size=16, epochs=2, checkpoint_every=3, seed=5,
                           device="cpu", progress=False, output_dir=tmp_path / out, **kw)

    full = Trainer(cfg("full"))
    save = full.save_checkpoint

    def save_and_keep():  # a finished run drops its step checkpoints: keep copies
        save()
        shutil.copy(checkpoint.step_path(tmp_path / "full", full.step),
                    tmp_path / f"step-{full.step}.pt")

    full.save_checkpoint = save_and_keep
    assert full.fit().step == 8
    resumed = Trainer(cfg("resumed", resume=str(tmp_path / "step-3.pt")))
    assert resumed.fit().step == 8
    for a, b in [(full.net, resumed.net), (full.aux, resumed.aux)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys() and all(
        torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"]) for k in oa)


def test_memory_roles_and_bench_flops(capsys):
    rule, net, aux = build("auglocal(d=2)", "resnet32", 16)
    params, _ = role_bytes(rule, net, aux)
    assert set(params) == {"backbone", "heads", "blocks"}
    heads = sum(p.numel() for h in aux for p in h.classifier.parameters())
    blocks = sum(p.numel() for h in aux for p in h.blocks.parameters())
    assert (params["heads"], params["blocks"]) == (4 * heads, 4 * blocks)
    assert params["backbone"] == 4 * sum(p.numel() for p in net.parameters())

    code = main(["bench", "--rule", "auglocal(d=1)", "--k", "4", "--batch-size", "4",
                 "--input-size", "16", "--warmup", "1", "--steps", "1", "--device", "cpu",
                 "--json"])
    assert code == 0
    report = BenchReport.model_validate_json(capsys.readouterr().out)
    a, b = report.rule, report.baseline
    assert b is not None and (a.spec.k, b.spec.rule) == (4, "bp")
    # the auxiliary blocks add work: more FLOPs an image than BP's step, less than twice
    assert b.flops_per_image < a.flops_per_image < 2 * b.flops_per_image


# ---------------------------------------------------------------------------- real learning
@pytest.mark.slow
def test_trains_on_digits_well_above_chance(tmp_path):
    # ResNet-32 in K=6 modules, d=1: 4 local modules with one-block auxiliary nets and the
    # last two modules trained together by the output loss; the embedded digits set (450 test
    # images), batch 64. Measured: 10.0%, 83.1% after epochs 1-2 of a 2-epoch run (98.0%
    # after 3 epochs). Chance is 10%, the bar 70%.
    cfg = make_config(rule="auglocal(d=1)", k=6, epochs=2, batch_size=64, lr=0.05,
                      progress=False, output_dir=tmp_path, device="cpu")
    result = fit(cfg)
    assert result.test_acc > 0.70, result.history


@pytest.mark.parametrize("model,K,d", [("resnet32", 16, 2), ("resnet110", 55, 3)])
def test_presets_hold_the_public_settings(model, K, d):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples/configs/auglocal"
    cfg = make_config(path / f"cifar10-{model}.toml")
    assert (cfg.rule, cfg.model, cfg.k, cfg.split) == (f"auglocal(d={d}, tau=0.5)", model, K,
                                                       "even")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay,
            cfg.warmup_epochs, cfg.warmup_lr, cfg.seed) == (400, 1024, 0.8, 0.9, True, 1e-4, 10,
                                                            0.01, 1234)
