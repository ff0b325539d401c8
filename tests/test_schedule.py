"""Learning-rate schedules by name (the public MLAAN trainers' per-epoch formulas beside the
default per-step warm-up and cosine), the public trainer's kept last partial batch, and a
resumed run that follows the same schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

from localearn.config import make_config
from localearn.data.loaders import make_loader
from localearn.engine import loop
from localearn.engine.loop import Trainer
from localearn.engine.schedule import make_schedule
from localearn.errors import UserError


def lr_at(name: str, epoch: int, *, lr: float, epochs: int, step: int = 0,
          steps_per_epoch: int = 10) -> float:
    cfg = make_config(schedule=name, lr=lr, epochs=epochs)
    schedule = make_schedule(cfg, steps_per_epoch)
    return schedule.lr(step, epoch, steps_per_epoch, steps_per_epoch * epochs)


# the public CIFAR trainer's --cos_lr at lr0 = 0.8 over 400 epochs, written out by hand: with
# e the epoch counted from 1, for e <= 10
#   0.5 * 0.8 * (1 + cos(pi * e / 400)) * (e - 1) / 10 + 0.01 * (11 - e) / 10,
# afterwards 0.5 * 0.8 * (1 + cos(pi * e / 400))
CIFAR = {
    1: 0.01,
    2: 0.4 * (1 + math.cos(math.pi * 2 / 400)) * 0.1 + 0.01 * 0.9,
    5: 0.4 * (1 + math.cos(math.pi * 5 / 400)) * 0.4 + 0.01 * 0.6,
    10: 0.4 * (1 + math.cos(math.pi * 10 / 400)) * 0.9 + 0.01 * 0.1,
    11: 0.4 * (1 + math.cos(math.pi * 11 / 400)),
    200: 0.4,  # cos(pi / 2) = 0
    300: 0.4 * (1 - math.sqrt(0.5)),  # cos(3 pi / 4)
    400: 0.0,  # cos(pi) = -1: the last epoch trains at 0, as the public code's does
}
# the public ImageNet trainer at lr 0.05 over 150 epochs: 0.5 * 0.05 * (1 + cos(pi * e' / 150))
# with e' counted from 0 (here epoch e = e' + 1), no warm-up
IMAGENET = {1: 0.05, 76: 0.025, 51: 0.025 * 1.5, 150: 0.025 * (1 + math.cos(math.pi * 149 / 150))}


@pytest.mark.parametrize("epoch", sorted(CIFAR))
def test_public_cifar_matches_the_public_formula(epoch):
    assert lr_at("public_cifar", epoch, lr=0.8, epochs=400) == pytest.approx(CIFAR[epoch],
                                                                              abs=1e-12)
    # about 0.72 at the end of the warm-up, 0.8 * (1 + cos(11 pi / 400)) / 2 just after
    assert CIFAR[10] == pytest.approx(0.7199, abs=1e-4)


@pytest.mark.parametrize("epoch", sorted(IMAGENET))
def test_public_imagenet_matches_the_public_formula(epoch):
    assert lr_at("public_imagenet", epoch, lr=0.05, epochs=150) == \
        pytest.approx(IMAGENET[epoch], abs=1e-12)


@pytest.mark.parametrize("name", ["public_cifar", "public_imagenet"])
def test_public_schedules_are_per_epoch_and_use_the_runs_epochs(name):
    # constant within an epoch, whatever the step
    same = {lr_at(name, 7, lr=0.8, epochs=20, step=s) for s in (60, 61, 65, 69)}
    assert len(same) == 1
    # the run's epochs stand in for the public 400: half way is half the peak
    half = {"public_cifar": 20, "public_imagenet": 21}[name]
    assert lr_at(name, half, lr=0.8, epochs=40) == pytest.approx(0.4, abs=1e-12)


def test_warmup_cosine_is_todays_schedule():
    cfg = make_config(lr=0.3, epochs=8, warmup_epochs=2, warmup_lr=0.02)
    schedule = make_schedule(cfg, steps_per_epoch=5)
    assert schedule.warmup_steps == 10 and schedule.name == "warmup_cosine"
    for step in range(41):
        want = loop.warmup_cosine(step, 40, 10, 0.3, 0.02)
        assert schedule.lr(step, step // 5 + 1, 5, 40) == want
    # by hand: half the warm-up, its end, half the cosine, the end
    assert schedule.lr(5, 2, 5, 40) == pytest.approx(0.02 + 0.28 / 2)
    assert schedule.lr(10, 3, 5, 40) == pytest.approx(0.3)
    assert schedule.lr(25, 6, 5, 40) == pytest.approx(0.15)
    assert schedule.lr(40, 8, 5, 40) == pytest.approx(0.0, abs=1e-15)
    default = make_schedule(make_config(epochs=20), steps_per_epoch=10)
    assert default.warmup_steps == 10  # 5% of 200 steps
    assert make_config().schedule == "warmup_cosine" and make_config().drop_last is True


def test_schedule_state_names_itself():
    schedule = make_schedule(make_config(schedule="public_cifar", lr=0.8, epochs=400), 49)
    state = schedule.state_dict()
    assert (state["name"], state["lr"], state["epochs"]) == ("public_cifar", 0.8, 400)
    schedule.load_state_dict(state)
    other = make_schedule(make_config(), 49)
    with pytest.raises(UserError, match="--schedule public_cifar"):
        other.load_state_dict(state)
    with pytest.raises(UserError, match="schedule"):
        make_config(schedule="cosine")


# ------------------------------------------------------------------ the trainer


def tiny(out, **extra):
    settings = dict(rule="bp", epochs=3, batch_size=16, train_limit=48, test_limit=16, lr=0.2,
                    device="cpu", progress=False, output_dir=out)
    return make_config(**{**settings, **extra})


def cifar_formula(e: int, lr: float, epochs: int) -> float:
    cosine = 0.5 * lr * (1 + math.cos(math.pi * e / epochs))
    return cosine * (e - 1) / 10 + 0.01 * (11 - e) / 10 if e <= 10 else cosine


def test_trainer_follows_the_public_schedule_and_a_resumed_run_continues_it(tmp_path):
    reference = Trainer(tiny(tmp_path / "full", schedule="public_cifar")).fit()
    lrs = [row["lr"] for row in reference.history]
    assert lrs == pytest.approx([cifar_formula(e, 0.2, 3) for e in (1, 2, 3)], abs=1e-12)
    assert lrs[0] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.008)  # cos(pi) = -1
    saved = torch.load(reference.checkpoint, weights_only=False)["scheduler"]
    assert saved["name"] == "public_cifar" and saved["step"] == 9

    out = tmp_path / "cut"
    victim = Trainer(tiny(out, schedule="public_cifar", checkpoint_every=1))
    inner = victim.rule.train_step

    def train_step(ctx, net, images, targets):
        if victim.step == 4:  # mid-epoch 2
            raise KeyboardInterrupt
        return inner(ctx, net, images, targets)

    victim.rule.train_step = train_step
    with pytest.raises(KeyboardInterrupt):
        victim.fit()
    resumed = Trainer(tiny(out, schedule="public_cifar", resume="latest"))
    result = resumed.fit()
    assert result.step == reference.step
    assert [row["lr"] for row in result.history] == lrs
    assert [row["train_loss"] for row in result.history] == \
        [row["train_loss"] for row in reference.history]


# ------------------------------------------------------------------ the last partial batch


def sizes(loader) -> list[int]:
    return [len(batch[1]) for batch in loader]


def test_drop_last_false_keeps_the_last_partial_batch():
    data = TensorDataset(torch.randn(50, 3), torch.arange(50))
    kept = make_loader(data, batch_size=16, train=True, drop_last=False)
    assert sizes(kept) == [16, 16, 16, 2] and len(kept) == 4
    dropped = make_loader(data, batch_size=16, train=True)
    assert sizes(dropped) == [16, 16, 16] and len(dropped) == 3
    # the same samples in the same order: the kept batch is the epoch's remainder
    assert torch.equal(torch.cat([b[1] for b in kept])[:48],
                       torch.cat([b[1] for b in dropped]))
    assert sorted(torch.cat([b[1] for b in kept]).tolist()) == list(range(50))
    # a remainder of one sample cannot train BatchNorm: dropped anyway
    one = make_loader(TensorDataset(torch.randn(49, 3), torch.arange(49)), batch_size=16,
                      train=True, drop_last=False)
    assert sizes(one) == [16, 16, 16] and len(one) == 3
    test = make_loader(data, batch_size=16, train=False, drop_last=True)
    assert sizes(test) == [16, 16, 16, 2]  # evaluation keeps every sample


def test_drop_last_false_across_ranks_and_after_a_resume():
    data = TensorDataset(torch.randn(50, 3), torch.arange(50))
    loaders = [make_loader(data, batch_size=10, train=True, rank=r, world_size=2,
                           drop_last=False) for r in (0, 1)]
    assert [sizes(ld) for ld in loaders] == [[10, 10, 5], [10, 10, 5]]  # 25 per rank
    assert [len(ld) for ld in loaders] == [3, 3]
    # resumed after two batches: the sampler skips 2 * batch_size samples, and the rest is
    # exactly the epoch's last (partial) batch
    full = list(loaders[0])
    loaders[0].sampler.skip = 2 * 10
    rest = list(loaders[0])
    loaders[0].sampler.skip = 0
    assert len(rest) == 1 and torch.equal(rest[0][1], full[-1][1])


class Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield torch.full((3,), float(i)), i


def test_drop_last_false_on_a_stream():
    kept = make_loader(Stream(37), batch_size=8, train=True, drop_last=False)
    assert sizes(kept) == [8, 8, 8, 8, 5] and len(kept) == 5
    assert torch.cat([b[1] for b in kept]).tolist() == list(range(37))
    dropped = make_loader(Stream(37), batch_size=8, train=True)
    assert sizes(dropped) == [8, 8, 8, 8] and len(dropped) == 4
    one = make_loader(Stream(33), batch_size=8, train=True, drop_last=False)
    assert sizes(one) == [8, 8, 8, 8] and len(one) == 4


def test_trainer_honours_drop_last(tmp_path):
    # 40 images in batches of 16: 2 full batches and one of 8
    kept = Trainer(tiny(tmp_path / "kept", train_limit=40, drop_last=False))
    assert kept.steps_per_epoch == 3
    assert Trainer(tiny(tmp_path / "dropped", train_limit=40)).steps_per_epoch == 2
