"""Pipelined stages: the K local modules in N contiguous stages, one process (or D data-parallel
processes) per stage, every stage training at the same time on a different batch.

Stage s runs batch t while stage s+1 runs batch t-1. Each stage runs the rule's own
`train_step` on its modules (`StepContext.modules`); the output of its last module goes to the
next stage, with the batch's images and targets, as the rule hands it on (`StepContext.leave`,
before that module's backward pass). A purely local rule needs nothing back, so module i at
step t sees the output of module i-1 after t-1 updates, exactly as in one process: the same
computation, bitwise on one thread per process. A rule whose losses reach back across modules
sends gradients back (`send_back` / `take_back`); units a rule reads on another stage (MLAAN's
EMA twins follow later blocks, `UpdateRule.units_read`) arrive after every optimizer step. In
``async`` mode those two arrive a step late, for rules that support it.

Each stage steps the optimizer on its own parameters only (the others have no gradient, and SGD
leaves a parameter without one untouched). Every process holds the whole network; `sync` makes
every copy current (each stage's parameters, buffers and optimizer state broadcast from it)
before evaluation and checkpoints, so those, and resume, work as for a one-process run.

The step's statistics are summed over all processes with a non-blocking all-reduce and read
``lag`` steps later (a blocking one would make every stage wait for the last at every step):
`drain` collects the rest, and a stop asked for on any process is seen by all at the same step.
A stage whose loss is not finite does not step; the verdict reaches every stage ``lag`` steps
later and all stop. Ranks are laid out stage-major: rank = stage * D + replica.
"""

from __future__ import annotations

import re
import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from localearn import distributed as dist_
from localearn.engine.parallel import DataEnd, NonFiniteLoss, Single
from localearn.engine.stages import Layout, StageLost, stage_ranges
from localearn.interfaces import SplitNetwork, UpdateRule

#: dtypes an activation may travel in (the code is the header's last field)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HEADER = 8  # int64 fields: batch, ndim, shape (up to 5 dims), dtype code


class Pipeline(Single):
    """This process's stage of a pipelined run (see the module's docs)."""

    def __init__(self, env: dist_.DistEnv, layout: Layout, starts: list[int],
                 rule: UpdateRule, net: SplitNetwork, optimizer: torch.optim.Optimizer,
                 device: torch.device, mode: str = "sync") -> None:
        super().__init__(env)
        self.layout, self.starts, self.stage_mode = layout, starts, mode
        self.rule, self.net, self.optimizer, self.device = rule, net, optimizer, device
        self.ranges = stage_ranges(starts, net.k)
        self.mine = self.ranges[layout.stage]
        self.first = layout.stage == 0
        self.last = layout.stage == layout.stages - 1
        self.lag = layout.stages
        convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        self.channels_last = bool(convs) and not convs[0].is_contiguous() and \
            convs[0].is_contiguous(memory_format=torch.channels_last)
        self.parts = self._parts()
        # groups: every process makes every group, in the same order
        self.groups = [dist.new_group([layout.rank_of(s, r) for r in range(layout.replicas)])
                       for s in range(layout.stages)] if layout.replicas > 1 else []
        group = self.groups[layout.stage] if self.groups else None
        owned = [p for p in self._params(layout.stage) if p.requires_grad]
        self.reducer = dist_.GradReducer(owned, layout.replicas, group=group) \
            if layout.replicas > 1 else None
        self._units_plan()
        self._stats: deque[tuple[Any, Tensor]] = deque()
        self._sends: deque[Any] = deque()  # activations in flight
        self._posted: deque[tuple[int, Any, Tensor]] = deque()  # gradients, units in flight
        self._step_no = 0
        self._entry: Tensor | None = None
        self._batch: tuple[Tensor, Tensor] | None = None
        self.waited = 0.0  # seconds spent blocked on other stages
        self.busy = 0.0  # seconds in steps
        self._began = 0.0

    # -- who owns what
    def _parts(self) -> list[tuple[list[nn.Module], list[nn.Parameter]]]:
        """Per stage: its modules (local modules, then the rule's parts) and loose parameters;
        a part two stages name belongs to the first."""
        seen: set[int] = set()
        out = []
        for r in self.ranges:
            modules: list[nn.Module] = [self.net.local_modules[i] for i in r]
            loose: list[nn.Parameter] = []
            for part in self.rule.stage_parts(r):
                if id(part) in seen:
                    continue
                seen.add(id(part))
                (loose if isinstance(part, nn.Parameter) else modules).append(part)
            out.append((modules, loose))
        return out

    def _params(self, stage: int) -> list[nn.Parameter]:
        modules, loose = self.parts[stage]
        return [p for m in modules for p in m.parameters()] + loose

    def _units_plan(self) -> None:
        """Which units this stage receives after each optimizer step (from which stage) and
        which it sends (to which stage)."""
        owner = {u: s for s, r in enumerate(self.ranges)
                 for i in r for u in self.net.unit_ranges[i]}
        reads = [sorted(set(self.rule.units_read(r))) for r in self.ranges]
        me = self.layout.stage
        self.units_in: dict[int, list[int]] = {}
        for u in reads[me]:
            if owner[u] != me:
                self.units_in.setdefault(owner[u], []).append(u)
        self.units_out = {s: [u for u in reads[s] if owner[u] == me]
                          for s in range(self.layout.stages) if s != me}
        self.units_out = {s: us for s, us in self.units_out.items() if us}

    # -- data
    @property
    def reads_data(self) -> bool:
        return self.first

    @property
    def data_rank(self) -> int:
        return self.layout.replica

    @property
    def data_world(self) -> int:
        return self.layout.replicas

    def end_of_data(self) -> None:
        """Tell the next stage (which passes it on) that this epoch's stream ended before its
        planned batches: a header for a batch of 0 images."""
        if self.last:
            return
        header = torch.zeros(HEADER, dtype=torch.long)
        try:
            self._sends.append([dist.isend(header, self._peer(self.layout.stage + 1))])
        except RuntimeError as exc:
            raise self._lost(exc, "sending the end of the data") from None

    # -- the rule's transport
    def modules(self, k: int) -> range:
        return self.mine

    def holds_last(self, k: int) -> bool:
        return self.last

    def begin(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        self._began = time.perf_counter()
        if not self.first:  # `DataEnd` leaves the step before it changes anything
            self._entry, images, targets = self._receive()
        self._batch = images, targets
        return images, targets

    def enter(self, index: int, x: Tensor) -> Tensor:
        return self._entry if index == self.mine.start and not self.first else x

    def leave(self, index: int, output: Tensor) -> None:
        if index == self.mine[-1] and not self.last:
            self._send(output, *self._batch)

    def send_back(self, grad: Tensor) -> None:
        self._post(grad.detach().contiguous(), self.layout.stage - 1,
                   "sending a gradient back")

    def take_back(self, like: Tensor) -> Tensor:
        start = time.perf_counter()
        grad = self._recv_like(like, self.layout.stage + 1, "receiving a gradient")
        self.waited += time.perf_counter() - start
        return grad

    # -- statistics
    def local_slots(self, k: int, count: int) -> tuple[int, int]:
        return self.mine.start, k - 1

    def verdict(self, stats: Tensor) -> bool:
        """No stage steps on a non-finite loss; the replicas of a stage agree on it."""
        bad = stats[-2] > 0
        if self.layout.replicas > 1:
            flag = stats[-2:-1].clone()
            dist.all_reduce(flag, group=self.groups[self.layout.stage])
            bad = flag.item() > 0
        return not bool(bad)

    def after_optimizer(self) -> None:
        """Send the units other stages read, as stepped; take the ones this stage reads (in
        async mode those of the previous step)."""
        for stage, units in self.units_out.items():
            flat = torch.cat([t.reshape(-1).double() for u in units
                              for t in self._unit_tensors(u)])
            self._post(flat, stage, "sending units read by another stage")
        start = time.perf_counter()
        if self.stage_mode == "sync" or self._step_no > 0:
            self._recv_units()
        self.waited += time.perf_counter() - start

    def finish(self, stats: Tensor) -> list[float]:
        """Start summing this step's statistics; the totals of the step ``lag`` steps back
        (zeros while the pipeline fills)."""
        self._step_no += 1
        self._wait_posted(self._step_no - 1)
        try:
            self._stats.append((dist.all_reduce(stats, async_op=True), stats))
        except RuntimeError as exc:
            raise self._lost(exc, "summing statistics") from None
        totals = [0.0] * (len(stats) - 2)
        if len(self._stats) > self.lag:
            totals = self._read(*self._stats.popleft())
        self.busy += time.perf_counter() - self._began  # the whole step, its waits included
        return totals

    def _read(self, work: Any, stats: Tensor) -> list[float]:
        start = time.perf_counter()
        try:
            work.wait()
        except RuntimeError as exc:
            raise self._lost(exc, "summing statistics") from None
        self.waited += time.perf_counter() - start
        totals = stats.tolist()
        stop, bad = totals.pop(), totals.pop()  # both read, whatever was asked before
        self.stop_requested = self.stop_requested or stop > 0
        if bad:
            raise NonFiniteLoss
        return totals

    def drain(self) -> list[float] | None:
        """Async: the units of the last step still in flight are taken and dropped (the rule's
        own messages went in its `flush`); then every send is waited for and the statistics
        not read yet are summed."""
        if self.stage_mode == "async" and self._step_no > 0:
            self._recv_units(apply=False)
            self._step_no = 0
        self._wait_posted(1 << 62)
        sums: list[float] | None = None
        while self._stats:
            totals = self._read(*self._stats.popleft())
            sums = totals if sums is None else [a + b for a, b in zip(sums, totals)]
        try:
            while self._sends:
                for work in self._sends.popleft():
                    work.wait()
        except RuntimeError as exc:
            raise self._lost(exc, "sending activations") from None
        return sums

    def idle_fraction(self) -> float:
        return self.waited / self.busy if self.busy else 0.0

    # -- point to point
    def _peer(self, stage: int) -> int:
        return self.layout.rank_of(stage)

    def _lost(self, exc: Exception, what: str) -> StageLost:
        text = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\]\s*", "", str(exc)).strip()  # Gloo's source line
        first = text.splitlines()[0] if text else type(exc).__name__
        return StageLost(f"stage {self.layout.stage} (rank {self.layout.rank}) lost its peer "
                         f"while {what} ({first[:160]}): another process of this pipelined job "
                         "stopped; every stage stops")

    def same_format(self, t: Tensor) -> Tensor:
        """Tensors travel contiguous; a channels-last run gets its 4-D ones back in that
        layout (as in one process, where nothing is converted)."""
        if self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def _receive(self) -> tuple[Tensor | None, Tensor, Tensor]:
        src = self._peer(self.layout.stage - 1)
        header = torch.zeros(HEADER, dtype=torch.long)
        start = time.perf_counter()
        try:
            dist.recv(header, src)
            if int(header[0]) == 0:  # the first stage's stream ran out early
                self.end_of_data()
                raise DataEnd
            ndim, dtype = int(header[1]), DTYPES[int(header[-1])]
            shape = [int(v) for v in header[2:2 + ndim]]
            x = torch.empty(shape, dtype=dtype, device=self.device) if ndim else None
            images = torch.empty(int(header[0]), *self.net.input_shape, device=self.device)
            targets = torch.empty(int(header[0]), dtype=torch.long, device=self.device)
            for t in (x, images, targets):
                if t is not None:  # a lockstep batch travels without activations
                    dist.recv(t, src)
        except RuntimeError as exc:
            raise self._lost(exc, "receiving activations") from None
        self.waited += time.perf_counter() - start
        return (None if x is None else self.same_format(x)), self.same_format(images), targets

    def _send(self, x: Tensor | None, images: Tensor, targets: Tensor) -> None:
        dst = self._peer(self.layout.stage + 1)
        header = torch.zeros(HEADER, dtype=torch.long)
        header[0] = len(targets)
        if x is not None:
            x = x.detach().contiguous()
            header[1], header[-1] = x.dim(), DTYPES.index(x.dtype)
            header[2:2 + x.dim()] = torch.tensor(x.shape)
        try:
            self._sends.append([dist.isend(t, dst) for t in
                                (header, x, images.contiguous(), targets) if t is not None])
            while len(self._sends) > self.lag:  # bounded: at most `lag` batches in flight
                for work in self._sends.popleft():
                    work.wait()
        except RuntimeError as exc:
            raise self._lost(exc, "sending activations") from None

    def _post(self, tensor: Tensor, stage: int, what: str) -> None:
        """Send without waiting (the handle is kept until two steps later, or `drain`)."""
        try:
            self._posted.append((self._step_no, dist.isend(tensor, self._peer(stage)), tensor))
        except RuntimeError as exc:
            raise self._lost(exc, what) from None

    def _wait_posted(self, before: int) -> None:
        try:
            while self._posted and self._posted[0][0] < before:
                self._posted.popleft()[1].wait()
        except RuntimeError as exc:
            raise self._lost(exc, "sending to another stage") from None

    def _recv_like(self, like: Tensor, stage: int, what: str) -> Tensor:
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        try:
            dist.recv(out, self._peer(stage))
        except RuntimeError as exc:
            raise self._lost(exc, what) from None
        return self.same_format(out)

    def _unit_tensors(self, unit: int) -> list[Tensor]:
        block = self.net.units[unit]
        return [t.data for t in [*block.parameters(), *block.buffers()]]

    def _recv_units(self, apply: bool = True) -> None:
        for stage, units in sorted(self.units_in.items()):
            tensors = [t for u in units for t in self._unit_tensors(u)]
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float64,
                               device=self.device)
            try:
                dist.recv(flat, self._peer(stage))
            except RuntimeError as exc:
                raise self._lost(exc, "receiving units trained by another stage") from None
            start = 0
            for t in tensors:
                if apply:
                    t.copy_(flat[start:start + t.numel()].view_as(t))
                start += t.numel()

    # -- make every process's copy whole
    def sync(self, net: nn.Module, aux: nn.Module) -> None:
        """Every process gets each stage's parameters, buffers and optimizer state from that
        stage's first replica (BatchNorm statistics averaged over the stage's replicas
        first)."""
        try:
            if self.layout.replicas > 1:
                group = self.groups[self.layout.stage]
                for m in self.parts[self.layout.stage][0]:
                    dist_.average_buffers(m, self.layout.replicas, group=group)
            for stage in range(self.layout.stages):
                self._broadcast_stage(stage)
        except RuntimeError as exc:
            raise self._lost(exc, "bringing the stages' weights together") from None

    def _broadcast_stage(self, stage: int) -> None:
        src = self.layout.rank_of(stage, 0)
        mine = self.layout.rank == src
        modules, loose = self.parts[stage]
        params = self._params(stage)
        tensors = [t.data for m in modules for t in [*m.parameters(), *m.buffers()]]
        tensors += [p.data for p in loose]
        # the optimizer's per-parameter state: names and plain values travel as an object
        keys = None
        if mine:
            keys = [{name: (tuple(v.shape), v.dtype) if isinstance(v, Tensor) else v
                     for name, v in self.optimizer.state.get(p, {}).items()} for p in params]
        box = [keys]
        dist.broadcast_object_list(box, src)
        for p, entry in zip(params, box[0]):
            state = self.optimizer.state[p] if entry else None
            for name, value in entry.items():
                if isinstance(value, tuple) and len(value) == 2 and \
                        isinstance(value[1], torch.dtype):
                    if not mine:
                        state[name] = torch.empty(value[0], dtype=value[1], device=p.device)
                    tensors.append(state[name])
                elif not mine:
                    state[name] = value
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group]) if mine else \
                torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype,
                            device=group[0].device)
            dist.broadcast(flat, src)
            if not mine:
                offset = 0
                for t in group:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
