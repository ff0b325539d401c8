"""Training recipes: AdamW with its weight-decay exemptions, per-module gradient clipping, label
smoothing reaching every rule's losses, mixup/cutmix with soft targets, RandAugment, the weight
average, their refusals, and exact resume of a run using them."""

from __future__ import annotations

import signal

import pytest
import torch
from helpers import INFO, batch
from safetensors.torch import load_file
from torch.nn import functional as F

from localearn import losses
from localearn.build import build_run
from localearn.config import make_config
from localearn.context import PlainContext
from localearn.engine import Trainer, TrainingInterrupted
from localearn.engine.recipe import BatchRecipe, StepRecipe
from localearn.errors import UserError
from localearn.export import export_safetensors
from localearn.optim import clip_groups


def _run(**settings):
    return build_run(make_config(device="cpu", **settings), info=INFO)


def test_adamw_exempts_norms_biases_position_embeddings_and_tokens():
    run = _run(model="vit_cifar", rule="dgl", k=3, optimizer="adamw", weight_decay=0.05,
               betas="0.9,0.95", eps=1e-6)
    opt = run.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    decayed, exempt = opt.param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.05, 0.0)
    assert decayed["betas"] == (0.9, 0.95) and decayed["eps"] == 1e-6
    names = {id(p): n for n, p in [*run.net.named_parameters(),
                                   *(("aux." + n, p) for n, p in run.aux.named_parameters())]}
    free = {names[id(p)] for p in exempt["params"]}
    assert any(n.endswith("pos_embed") for n in free) and any(n.endswith("cls_token")
                                                              for n in free)
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith(("pos_embed", "cls_token"))
               for p in exempt["params"])
    assert any(n.startswith("aux.") for n in free)  # the heads' norms and biases too
    assert len(decayed["params"]) + len(exempt["params"]) == len(run.params)


def test_sgd_stays_one_group_decaying_everything_unless_asked():
    run = _run(rule="dgl", k=2)
    (group,) = run.optimizer.param_groups
    assert isinstance(run.optimizer, torch.optim.SGD) and group["nesterov"]
    assert group["weight_decay"] == 1e-4 and len(group["params"]) == len(run.params)
    assert len(_run(rule="dgl", k=2, decay_on="weights").optimizer.param_groups) == 2


def test_clipping_is_per_module_and_does_not_couple_modules():
    run = _run(rule="dgl", k=3, clip_grad=1.0)
    groups = run.step.recipe.clip_groups
    assert len(groups) == 3
    ids = [id(p) for g in groups for p in g]
    assert sorted(ids) == sorted(id(p) for p in run.params)  # each parameter in one group
    for i, group in enumerate(groups):
        own = {id(p) for p in run.net.local_modules[i].parameters()}
        if i < 2:
            own |= {id(p) for p in run.rule.heads[i].parameters()}
        assert {id(p) for p in group} == own
    for scale, group in zip((100.0, 1e-3, 1e-3), groups):  # one module's gradient is huge
        for p in group:
            p.grad = torch.full_like(p, scale)
    small = [p.grad.clone() for p in groups[1]]
    run.step.recipe.clip()
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in groups[0]])) == \
        pytest.approx(1.0, rel=1e-4)
    assert all(torch.equal(a, p.grad) for a, p in zip(small, groups[1]))  # untouched
    everything = clip_groups(run.rule, run.net, run.params, range(3), "global")
    assert len(everything) == 1 and len(everything[0]) == len(run.params)
    with pytest.raises(UserError, match="every stage"):  # a stage holding modules 0 and 1
        clip_groups(run.rule, run.net, run.params, range(2), "global")
    assert len(clip_groups(run.rule, run.net, run.params, range(2), "module")) == 2


def test_an_end_to_end_rule_clips_one_norm_over_its_modules():
    run = _run(rule="bp(schedule=one_f_one_b)", k=3, clip_grad=1.0)
    assert run.net.k == 3 and len(run.step.recipe.clip_groups) == 1
    assert len(run.step.recipe.clip_groups[0]) == len(run.params)


@pytest.mark.parametrize("rule,k", [
    ("dgl", 3), ("linear", 3), ("bp", 1), ("infopro(loss=ce, ixy_1=1)", 3),
    ("mlaan(dgl, k=1)", 3), ("hpff(dgl)", 3), ("auglocal(d=1)", 3), ("man(dgl)", 3)])
def test_label_smoothing_reaches_every_loss_of_every_rule(rule, k):
    run = _run(rule=rule, k=k)
    images, targets = batch(8)

    def step_losses(eps: float) -> list[float]:
        torch.manual_seed(0)
        with losses.using(losses.LossRecipe(eps)):
            out = run.rule.train_step(PlainContext(), run.net, images, targets)
        return [float(out.loss), *map(float, out.local_losses)]

    plain, smooth = step_losses(0.0), step_losses(0.3)
    assert len(plain) == (k if rule != "auglocal(d=1)" else k - 1)  # its tail is one module
    assert all(a != b for a, b in zip(plain, smooth)), (plain, smooth)
    assert step_losses(0.0) == plain  # outside a recipe: plain cross-entropy again


def test_cross_entropy_takes_soft_targets_and_smooths_hard_ones():
    from timm.loss import SoftTargetCrossEntropy

    logits = torch.randn(6, 10)
    hard = torch.tensor([0, 1, 2, 3, 4, 5])
    soft = torch.softmax(torch.randn(6, 10), 1)
    with losses.using(losses.LossRecipe(0.1)):
        assert torch.allclose(losses.cross_entropy(logits, hard),
                              F.cross_entropy(logits, hard, label_smoothing=0.1))
        # soft targets carry their smoothing already (timm's Mixup smooths them)
        assert torch.allclose(losses.cross_entropy(logits, soft),
                              SoftTargetCrossEntropy()(logits, soft))
    assert torch.equal(losses.hard_labels(soft), soft.argmax(1))


def test_mixup_cutmix_make_smoothed_soft_targets_and_randaugment_keeps_shapes():
    recipe = BatchRecipe(INFO, mixup=0.8, cutmix=1.0, label_smoothing=0.1, randaugment=9)
    images, targets = batch(8)
    images = images.clamp(-2, 2)
    torch.manual_seed(0)
    mixed, soft = recipe(images.clone(), targets)
    assert mixed.shape == images.shape and soft.shape == (8, 10)
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert soft.min() >= 0.1 / 10 - 1e-6  # smoothed: no class at zero
    assert not torch.equal(mixed, images)
    odd_images, odd_soft = recipe(images[:3].clone(), targets[:3])  # a last partial batch
    assert torch.allclose(odd_soft.max(1).values, torch.full((3,), 0.9 + 0.01))


def test_step_statistics_count_mixed_targets_against_their_main_class():
    run = build_run(make_config(device="cpu", rule="dgl", k=2, mixup=0.4), info=INFO)
    assert isinstance(run.step.recipe, StepRecipe) and run.step.recipe.batch is not None
    images, targets = batch(8)
    totals = run.step(images, targets)
    assert totals[2] == 8 and 0 <= totals[1] <= 8


@pytest.mark.parametrize("settings,says", [
    ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"mixup": 0.8, "batch_size": 15}, "batch_size must be even"),
    ({"cutmix": 1.0, "stages": 2}, "pipelined stages"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"betas": "0.9"}, "two numbers"),
    ({"optimizer": "adam"}, "optimizer"),
    ({"clip_grad": 0}, "clip_grad"),
])
def test_bad_recipe_settings_are_one_line(settings, says):
    with pytest.raises(UserError) as err:
        make_config(**settings)
    assert says in str(err.value) and "\n" not in str(err.value)


RECIPE = dict(rule="dgl", k=2, epochs=2, train_limit=64, test_limit=32, batch_size=16,
              seed=3, device="cpu", progress=False, optimizer="adamw", lr=1e-3,
              weight_decay=0.05, clip_grad=0.5, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
              randaugment=9, ema_decay=0.9, keep_checkpoints=10)


def test_adamw_clipping_mixup_and_ema_resume_exactly(tmp_path):
    full = Trainer(make_config(**RECIPE, output_dir=tmp_path / "full")).fit()

    cut = Trainer(make_config(**RECIPE, output_dir=tmp_path / "cut"))
    train_step = cut.rule.train_step

    def stop_after_six(ctx, net, images, targets):  # a SIGTERM during step 6 (epoch 2)
        result = train_step(ctx, net, images, targets)
        if cut.step + 1 == 6:
            cut._signals.signum = signal.SIGTERM
        return result

    cut.rule.train_step = stop_after_six
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    resumed = Trainer(make_config(**RECIPE, output_dir=tmp_path / "cut", resume="latest"))
    assert resumed.step == 0  # loaded in fit
    done = resumed.fit()
    a = torch.load(full.checkpoint, weights_only=True)
    b = torch.load(done.checkpoint, weights_only=True)
    assert a["step"] == b["step"] == 8
    for part in ("model", "aux", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert [r["test_acc"] for r in full.history] == [r["test_acc"] for r in done.history]
    # the weight average is what was evaluated, and it differs from the trained weights
    assert any(not torch.equal(a["ema"]["ema.module." + k], v) for k, v in a["model"].items()
               if v.is_floating_point())
    with pytest.raises(UserError, match="optimizer 'adamw'"):  # another optimizer: refused
        Trainer(make_config(**{**RECIPE, "optimizer": "sgd"}, output_dir=tmp_path / "cut",
                            resume="latest", overwrite=True)).fit()
    # export writes the evaluated network: the average
    exported = load_file(export_safetensors(done.checkpoint, tmp_path / "net.safetensors"))
    trained = done.net.backbone.state_dict()
    assert not all(torch.equal(exported[k], trained[k]) for k in exported)
    average = resumed.run.ema.module.backbone.state_dict()
    assert all(torch.equal(exported[k], average[k]) for k in exported)
