"""Data-parallel training on CPU with Gloo: two processes, per-module gradient all-reduce.

The single-process reference: each rank's BatchNorm normalises over its own half of the global
batch, so a plain single-process step on the whole batch is a different computation. The
reference therefore runs the same global batch as two micro-batches (the two ranks' halves,
each loss scaled by 1/2 through the step context's ``backward``) and one optimizer step: in
exact arithmetic that is what the two ranks compute together, BatchNorm in training mode
included. Data order and augmentation are functions of (seed, epoch, index), so the reference
sees exactly the samples and crops each rank saw.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from localearn import distributed
from localearn.config import FitConfig
from localearn.data.sampling import SeededSamples, ShardSampler
from localearn.engine import Trainer, evaluate
from localearn.interfaces import PlainContext

WORLD = 2
RANK_BATCH = 16
SETTINGS = dict(rule="dgl", model="resnet32", k=4, train_limit=128, test_limit=96,
                epochs=1, lr=0.05, device="cpu", progress=False, seed=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cfg = FitConfig(**SETTINGS, batch_size=RANK_BATCH, output_dir=Path(out) / "run")
    trainer = Trainer(cfg)  # joins the Gloo group from the torchrun-style variables
    assert trainer.env.world_size == world and trainer.reducer is not None
    _check_reducer(rank)
    announced: list[int] = []
    reducer_announce = trainer.reducer.announce

    def spy(params):
        announced.append(len(list(params)))
        reducer_announce(params)

    # the rule's notifications reach the reducer: one announcement per module per step
    trainer.stepper.ctx.grads_ready = lambda ps, f=spy: f(list(ps))
    result = trainer.fit()
    torch.save({"params": {n: p.detach().clone() for n, p in
                           [*trainer.net.named_parameters(), *trainer.aux.named_parameters()]},
                "buffers": {n: b.clone() for n, b in trainer.net.named_buffers()},
                "test_acc": result.test_acc, "history": result.history,
                "announced": announced, "steps": trainer.step},
               Path(out) / f"rank{rank}.pt")


def _check_reducer(rank: int) -> None:
    """Unannounced gradients are reduced at `finish`; a gradient changed after its
    announcement is refused."""
    w = torch.nn.Parameter(torch.zeros(3))
    v = torch.nn.Parameter(torch.zeros(2))
    reducer = distributed.GradReducer([w, v], WORLD, bucket_mb=1e-6)  # a bucket per tensor
    reducer.start()
    w.grad = torch.full((3,), float(rank + 1))
    v.grad = torch.full((2,), 10.0 * (rank + 1))
    reducer.announce([w])
    reducer.finish()  # v was never announced: reduced here
    assert torch.equal(w.grad, torch.full((3,), 1.5))
    assert torch.equal(v.grad, torch.full((2,), 15.0))
    reducer.start()
    w.grad = torch.ones(3)
    reducer.announce([w])
    w.grad.add_(1.0)  # a rule bug: the gradient changes after it was announced
    with pytest.raises(RuntimeError, match="changed a gradient after announcing"):
        reducer.finish()


def _reference(tmp_path: Path) -> Trainer:
    """One process, global batch = both ranks' halves as two micro-batches per step."""
    cfg = FitConfig(**SETTINGS, batch_size=RANK_BATCH * WORLD, output_dir=tmp_path / "single")
    t = Trainer(cfg)

    class Halved(PlainContext):  # each rank's loss is half of the global batch's
        def backward(self, loss, *, retain_graph=False):
            super().backward(loss / WORLD, retain_graph=retain_graph)

    ctx = Halved()
    samplers = [ShardSampler(len(t.data.train), shuffle=True, seed=cfg.seed, rank=r,
                             world_size=WORLD) for r in range(WORLD)]
    data = SeededSamples(t.data.train, cfg.seed)
    t.net.train()
    t.aux.train()
    for epoch in range(1, cfg.epochs + 1):
        data.set_epoch(epoch)
        shards = []
        for s in samplers:
            s.set_epoch(epoch)
            shards.append(s.indices())
        for b in range(t.steps_per_epoch):
            t.set_lr()
            t.optimizer.zero_grad(set_to_none=True)
            for shard in shards:
                samples = [data[i] for i in shard[b * RANK_BATCH:(b + 1) * RANK_BATCH]]
                images = torch.stack([x for x, _ in samples])
                targets = torch.tensor([y for _, y in samples])
                t.rule.train_step(ctx, t.net, images, targets)
            t.optimizer.step()
            t.rule.after_step()
            t.step += 1
    return t


def test_two_gloo_processes_match_each_other_and_one_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # both ranks: bitwise identical parameters and (averaged) BatchNorm statistics
    for key in ("params", "buffers"):
        a, b = ranks[0][key], ranks[1][key]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a), key
    assert ranks[0]["test_acc"] == ranks[1]["test_acc"]
    assert ranks[0]["history"][0]["train_loss"] == ranks[1]["history"][0]["train_loss"]
    steps = ranks[0]["steps"]
    assert steps == 4  # 128 images, 2 ranks of 16: 4 steps
    # K=4: every module announced its gradients in every step
    assert ranks[0]["announced"].count(ranks[0]["announced"][0]) == steps
    assert len(ranks[0]["announced"]) == 4 * steps

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same float summation order
    try:
        ref = _reference(tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert ref.step == steps
    got = ranks[0]["params"]
    ref_params = dict([*ref.net.named_parameters(), *ref.aux.named_parameters()])
    assert ref_params.keys() == got.keys()
    worst = max((ref_params[n].detach() - got[n]).abs().max().item() for n in got)
    moved = max((p.detach() - q).abs().max().item() for p, q in
                zip(Trainer(ref.cfg).net.parameters(), ref.net.parameters()))
    assert moved > 1e-3  # training really changed the weights ...
    assert worst < 1e-5, worst  # ... and the two computations agree to float rounding
    print(f"largest difference to one process: {worst:.2e} (weights moved {moved:.2e})")

    # the test accuracy reduced over ranks equals one process evaluating the whole test set
    ref.net.load_state_dict({**ref.net.state_dict(),
                             **{n: v for n, v in got.items() if n.startswith("local_modules")},
                             **ranks[0]["buffers"]})
    full = torch.utils.data.DataLoader(ref.data.test, batch_size=256)
    assert evaluate(ref.net, full, ref.device) == ranks[0]["test_acc"]


@pytest.mark.slow
def test_cli_nproc_2_runs_under_torchrun(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "localearn", "fit", "--nproc", "2", "--rule", "dgl",
                        "--k", "2", "--epochs", "1", "--train-limit", "64", "--test-limit", "64",
                        "--batch-size", "16", "--device", "cpu", "--no-progress",
                        "--output-dir", str(out)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("final test accuracy") == 1  # only rank 0 prints
    assert "2 processes" in r.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2  # 64 images / (2 x 16)
    assert len(ckpt["rng"]) == 2  # both ranks' RNG states, for exact resume
    # recorded as launched, so that a resume takes it up again
    assert ckpt["config"]["nproc"] == 2
    assert json.loads((out / "config.json").read_text())["nproc"] == 2


def test_shard_sampler_splits_pads_and_skips():
    ranks = [ShardSampler(10, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(1)
    shards = [s.indices() for s in ranks]
    assert [len(s) for s in ranks] == [4, 4, 4]  # padded: every rank takes the same steps
    assert set().union(*shards) == set(range(10))
    ranks[0].set_epoch(2)
    assert ranks[0].indices() != shards[0]  # a new order every epoch ...
    ranks[0].set_epoch(1)
    assert ranks[0].indices() == shards[0]  # ... a function of (seed, epoch)
    ranks[0].skip = 3
    assert list(ranks[0]) == shards[0][3:] and len(ranks[0]) == 1
    evals = [ShardSampler(10, shuffle=False, rank=r, world_size=3, pad=False) for r in range(3)]
    assert sorted(i for s in evals for i in s) == list(range(10))  # no duplicates at test time


def test_seeded_samples_repeat_per_epoch_and_spare_the_global_rng():
    from torchvision.transforms import v2

    from localearn.data import TensorImages

    images = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    data = SeededSamples(TensorImages(images, torch.arange(4), v2.RandomCrop(8, padding=3)),
                         seed=1)
    state = torch.get_rng_state()
    first = data[2][0]
    assert torch.equal(torch.get_rng_state(), state)  # model-side randomness is unaffected
    torch.rand(5)  # whatever else happens between two reads of the sample ...
    assert torch.equal(data[2][0], first)  # ... the same crop
    crops = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        crops.add(tuple(data[2][0].flatten().tolist()))
    assert len(crops) > 1  # other epochs, other crops
