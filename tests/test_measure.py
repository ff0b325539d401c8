"""`localearn memory` and `localearn bench`: byte accounting, the CPU peak, JSON and errors."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from localearn.cli import main
from localearn.errors import UserError
from localearn.interfaces import DataInfo, PlainContext, SplitNetwork, StepResult, UpdateRule
from localearn.measure import (
    BenchReport,
    MemoryReport,
    RunSpec,
    TrainingRun,
    cpu_peak,
    grad_bytes,
    make_spec,
    measure_memory,
    measure_memory_here,
    optimizer_bytes,
    replay_peak,
    role_bytes,
)

F32 = 4  # bytes per float32
I64 = 8  # BatchNorm's num_batches_tracked


class TinyRule(UpdateRule):
    """A rule with all four roles: heads, trained copies (one tensor shared with the backbone,
    which must count once) and frozen EMA twins."""

    def setup(self, net: SplitNetwork, info: DataInfo) -> nn.Module:
        copy = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        copy.weight = net.units[1][0].weight  # shared with the backbone: counted there only
        twins = nn.Linear(4, 4)
        twins.requires_grad_(False)
        return nn.ModuleDict({
            "heads": nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)),
            "copies": nn.Sequential(copy, nn.Conv2d(4, 2, 1)),
            "twins": twins,
            "unclaimed": nn.Linear(2, 1, bias=False),
        })

    def aux_groups(self, aux: nn.Module) -> dict[str, nn.Module]:
        return {"heads": aux["heads"], "copies": aux["copies"], "twins": aux["twins"]}

    def train_step(self, ctx, net, images, targets):
        aux = self.aux
        feats = net.local_modules[0](images)
        loss = nn.functional.cross_entropy(net.local_modules[1](feats), targets)
        pooled = feats.mean((2, 3))
        loss = loss + aux["heads"](pooled).sum() + aux["copies"](feats).sum() * 0
        loss = loss + aux["unclaimed"](aux["twins"](pooled)[:, :2]).sum() * 0
        loss.backward()
        return StepResult(loss=loss.item(), logits=feats)


def tiny_network() -> SplitNetwork:
    units = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),
             nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return SplitNetwork(units, classifier, [1], (3, 8, 8))


def test_parameter_bytes_equal_hand_computed_sums():
    torch.manual_seed(0)
    net, rule = tiny_network(), TinyRule()
    rule.aux = aux = rule.setup(net, DataInfo(2, (3, 8, 8), (0.5,) * 3, (0.5,) * 3))
    params, buffers = role_bytes(rule, net, aux)

    backbone = (3 * 4 * 9) + (4 + 4) + (4 * 4 * 9 + 4) + (4 * 2 + 2)  # conv, bn, conv, linear
    heads = (4 * 3 + 3) + (3 + 3)  # linear, bn1d
    copies = 4 * 2 + 2  # the shared 1x1 conv is the backbone's
    twins = 4 * 4 + 4
    assert params == {"backbone": backbone * F32, "heads": heads * F32, "copies": copies * F32,
                      "twins": twins * F32, "other": 2 * F32}
    assert buffers["backbone"] == 8 * F32 + I64 and buffers["heads"] == 6 * F32 + I64
    assert buffers["copies"] == buffers["twins"] == buffers["other"] == 0

    # one step of SGD with momentum: gradients and momentum for every trainable tensor once
    trainable = [p for p in {id(p): p for p in [*net.parameters(), *aux.parameters()]}.values()
                 if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    rule.train_step(PlainContext(), net, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    opt.step()
    expected = (backbone + heads + copies + 2) * F32  # twins are frozen
    assert grad_bytes(trainable) == expected
    assert optimizer_bytes(opt) == expected


def test_replay_peak_orders_events_by_time():
    # a free at t=2 before an allocation at t=3: the peak is 10, not 15
    assert replay_peak([(3, 5), (1, 10), (2, -10), (4, -5)]) == 10
    assert replay_peak([]) == 0


def test_cpu_peak_sees_real_allocations():
    def work():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # 2 MB, both live: 6 MB
        del a, b
        c = torch.empty(1_200_000)  # 4.8 MB alone
        return c.numel()

    n, peak = cpu_peak(work)
    assert n == 1_200_000
    assert 6_000_000 <= peak < 6_000_000 + 100_000


def _spec(**kw) -> RunSpec:
    return RunSpec(**{"model": "resnet32", "input_size": 32, "device": "cpu", **kw})


@pytest.mark.slow
def test_memory_json_peak_grows_with_batch_and_bp_exceeds_dgl(capsys):
    # the command itself (fresh process per configuration) with a pydantic-validated report,
    # and, concurrently, the same DGL configuration at a smaller batch in its own process;
    # 512 MB held here must not show in the workers' resident sets (Linux carries ru_maxrss
    # over fork and exec)
    ballast = torch.ones(128 * 2**20)
    with ThreadPoolExecutor(1) as pool:
        small = pool.submit(measure_memory, _spec(rule="dgl", k=16, batch_size=8),
                            rss_pass=False)  # one profiled pass only: the peak is the same
        code = main(["memory", "--rule", "dgl", "--k", "16", "--batch-size", "32", "--vs", "bp",
                     "--device", "cpu", "--json"])
        small = small.result()
    out = capsys.readouterr().out
    assert code == 0
    report = MemoryReport.model_validate_json(out)
    if sys.platform == "linux":
        parent = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
        assert small.rss_before_bytes < parent - 256 * 2**20
    del ballast
    dgl, bp = report.rule, report.baseline
    assert bp is not None and bp.spec.rule == "bp" and bp.spec.k == 1 and dgl.spec.k == 16
    assert dgl.peak_method == "profiler memory events"
    assert dgl.rss_pass and bp.rss_pass and not small.rss_pass
    assert small.peak_bytes < dgl.peak_bytes  # grows with the batch
    assert dgl.peak_bytes < bp.peak_bytes  # local learning frees each module's graph
    assert report.peak_ratio == pytest.approx(dgl.peak_bytes / bp.peak_bytes)
    for r in (small, dgl, bp):
        # the peak holds at least the parameters, gradients and optimizer state
        persistent = sum(r.param_bytes.values()) + r.grad_bytes + r.optimizer_bytes
        assert r.peak_bytes > persistent
    # the cross-check: BP's activations made the process's resident set grow about as much
    assert bp.peak_rss_bytes - bp.rss_before_bytes > 0.5 * bp.peak_bytes
    assert dgl.param_bytes["backbone"] == bp.param_bytes["backbone"]
    assert bp.param_bytes["heads"] == 0 < dgl.param_bytes["heads"]
    assert dgl.grad_bytes == dgl.optimizer_bytes == (dgl.param_bytes["backbone"]
                                                     + dgl.param_bytes["heads"])


def test_worker_errors_come_back_as_one_line():
    with pytest.raises(UserError, match=r"^unknown rule 'nope'; registered rules:"):
        measure_memory(_spec(rule="nope"))


def test_bench_json_counts_training_flops(capsys):
    code = main(["bench", "--rule", "dgl", "--k", "4", "--batch-size", "4", "--input-size", "16",
                 "--warmup", "1", "--steps", "2", "--device", "cpu", "--json"])
    assert code == 0
    report = BenchReport.model_validate_json(capsys.readouterr().out)
    a, b = report.rule, report.baseline
    assert b is not None and (a.spec.rule, a.spec.k, b.spec.rule, b.spec.k) == ("dgl", 4, "bp", 1)
    assert len(a.step_times_s) == len(b.step_times_s) == 2
    assert a.images_per_s == pytest.approx(4 / a.median_step_s)
    assert report.time_ratio == pytest.approx(a.median_step_s / b.median_step_s)
    assert a.achieved_flops_per_s == pytest.approx(a.flops_per_image * 4 / a.median_step_s)

    # BP's training step costs about three forwards: forward, gradient of the inputs (none for
    # the first convolution) and gradient of the weights
    run = TrainingRun(_spec(rule="bp", batch_size=4, input_size=16), torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        run.net(run.images)
    forward = counter.get_total_flops() / 4
    assert 2.5 * forward < b.flops_per_image <= 3 * forward


@pytest.mark.parametrize("args,message", [
    (["memory", "--batch-size", "0"], "invalid --batch-size: Input should be greater than or "
                                      "equal to 1"),
    (["memory", "--input-size", "2"], "invalid --input-size"),
    (["memory", "--rule", "nope"], "unknown rule 'nope'; registered rules:"),
    (["memory", "--k", "99"], "K=99 is out of range"),
    (["memory", "--model", "vgg"], "unknown model 'vgg'"),
    (["memory", "--vs", "dgl((("], "malformed rule expression"),
    (["memory", "--steps", "0"], "invalid --steps: must be >= 1"),
    (["memory", "--batch-size", "many"], "invalid int value: 'many'"),
    (["bench", "--rule", "bp", "--k", "4"], "rule 'bp' trains end to end, so K must be 1"),
    (["bench", "--vs", "bp", "--vs-k", "3"], "rule 'bp' trains end to end, so K must be 1"),
    (["bench", "--steps", "0"], "invalid --steps: must be >= 1 (got 0)"),
    (["bench", "--warmup", "-1"], "invalid --warmup: must be >= 0 (got -1)"),
    (["bench", "--device", "tpu"], "invalid --device: unknown device 'tpu'; valid: auto, cpu,"),
    (["bench", "--vs-k", "0"], "invalid --vs-k: must be >= 1 (got 0)"),
])
def test_bad_arguments_get_one_clear_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("localearn: error: ")
    assert message in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_memory_measurement_leaves_the_allocator_as_it_found_it():
    # the CPU tensor peak is measured with blocks of 128 KiB and more mapped one by one; left
    # so, every later 4 MiB tensor would be mapped afresh (1,024 page faults each) and training
    # in the same process ran 2.4 times slower
    import resource

    spec = make_spec(rule="dgl", k=2, batch_size=4, input_size=16, device="cpu")
    measure_memory_here(spec, steps=1, rss_pass=False)
    torch.ones(1 << 20).sum()  # one 4 MiB block, then the same size again and again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        torch.ones(1 << 20).sum()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 50 * 1024 // 8, faults
