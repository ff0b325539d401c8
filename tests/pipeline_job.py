"""A job for tests/test_pipeline.py, run under torchrun: registers a third-party rule (`Probe`,
built on LocalRule, defined here and in no installed package) and a dataset (`short_digits`, a
stream that holds fewer samples than it states and counts what each process reads), then runs
``localearn ARGS``."""

from __future__ import annotations

import os
import sys

from torch import Tensor, nn
from torch.utils.data import IterableDataset

from localearn.data.datasets import DataSplits, digits
from localearn.interfaces import AuxHead, DataInfo, LocalRule, Shape, SplitNetwork, StepResult

#: samples this process has read from a `ShortStream`
READS = [0]


class ProbeHead(AuxHead):
    """Global average pooling and a linear classifier; cross-entropy."""

    def __init__(self, shape: Shape, info: DataInfo) -> None:
        super().__init__(shape, info)
        self.fc = nn.Linear(shape[0], info.num_classes)

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self.fc(features.mean((2, 3))), targets)


class Probe(LocalRule):
    """A linear probe per module. ``crash_at=N``: the process training the last module exits
    abruptly (exit code 3) at its N-th step, as a stage that dies would."""

    description = "test rule: a linear probe per module"

    def __init__(self, crash_at: int = 0) -> None:
        super().__init__()
        self.crash_at, self.calls = crash_at, 0

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        return ProbeHead(shape, info)

    def module_loss(self, net: SplitNetwork, index: int, x: Tensor, images: Tensor,
                    targets: Tensor) -> tuple[Tensor, Tensor]:
        if index == net.k - 1 and net.training:
            self.calls += 1
        return super().module_loss(net, index, x, images, targets)

    def after_step(self) -> None:
        # after the step (not in it: balancing the stages runs the step on a copy first)
        if self.crash_at and self.calls == self.crash_at:
            os._exit(3)


class Reach(LocalRule):
    """A rule built like MLAAN but outside the first-party plugins: each module's loss trains
    that module and the one before it (cascades of depth 2), so on pipelined stages the
    gradient at a stage's first input goes back to the previous stage, which routes it through
    its last module. It uses only the `StepContext` primitives: the engine knows nothing of it.
    """

    description = "test rule: every loss also trains the module before its own"

    def make_head(self, index: int, num_modules: int, shape: Shape, info: DataInfo) -> AuxHead:
        return ProbeHead(shape, info)

    def stage_check(self, ranges, mode, precision):
        return None if mode == "sync" else "Reach has no async mode"

    def train_step(self, ctx, net: SplitNetwork, images: Tensor, targets: Tensor):
        K = net.k
        mine = ctx.modules(K)
        x, local, held = images, [], None  # held: the previous module's (output, params)
        for i in mine:
            module = net.local_modules[i]
            a = ctx.enter(i, x).detach().requires_grad_(i > 0)
            out = module(a)
            ctx.leave(i, out)
            leaf = out.detach().requires_grad_()
            loss = (self.heads[i].loss(leaf, targets, images) if i < K - 1
                    else nn.functional.cross_entropy(leaf, targets))
            ctx.backward(loss)
            own = list(module.parameters())
            ctx.backward_from(out, leaf.grad, inputs=[*own, a] if i > 0 else own,
                              retain_graph=True)  # module i's graph serves the next loss too
            if i < K - 1:
                local.append(loss.detach())
                ctx.grads_ready(self.heads[i].parameters())
            if i > 0 and held is None:  # module i-1 lives on the previous stage
                ctx.send_back(a.grad)
            elif i > 0:
                ctx.backward_from(held[0], a.grad, inputs=held[1])
                ctx.grads_ready(held[1])
            held, x = (out, own), out
        if mine.stop < K:  # the next stage's first loss reaches this stage's last module
            ctx.backward_from(held[0], ctx.take_back(held[0]), inputs=held[1])
        ctx.grads_ready(held[1])
        last = mine.stop == K
        return StepResult(loss=loss.detach() if last else None,
                          logits=out.detach() if last else None, local_losses=local)


class ShortStream(IterableDataset):
    """``base`` as a stream, in order, that states len(base) samples but holds the first
    ``held``; reading one counts it in `READS`."""

    def __init__(self, base, held: int) -> None:
        self.base, self.held = base, held

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        for i in range(self.held):
            READS[0] += 1
            yield self.base[i]


def short_digits(data_dir=None, **kw) -> DataSplits:
    """Digits, the training split a `ShortStream` holding ``$HELD`` samples; with
    ``$READS_DIR`` set, each process writes its count there at exit (``reads-RANK``)."""
    splits = digits(data_dir, **kw)
    held = int(os.environ.get("HELD", len(splits.train)))
    if os.environ.get("READS_DIR"):
        import atexit
        from pathlib import Path

        out = Path(os.environ["READS_DIR"]) / f"reads-{os.environ.get('RANK', '0')}"
        atexit.register(lambda: out.write_text(str(READS[0])))
    return DataSplits(ShortStream(splits.train, held), splits.test, splits.info)


if __name__ == "__main__":
    from localearn import registry
    from localearn.cli import main

    registry.register("rule", "pipeprobe", Probe)
    registry.register("rule", "reach", Reach)
    registry.register("dataset", "short_digits", short_digits)
    sys.exit(main(sys.argv[1:]))
