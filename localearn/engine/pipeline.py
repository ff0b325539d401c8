"""Pipelined training: the K local modules in N contiguous stages, one process (or D data-parallel
processes) per stage, every stage training at the same time on a different batch.

Stage s runs batch t's forward through its modules while stage s+1 runs batch t-1: the output of
a stage's last module (with the batch's images and targets) goes to the next stage by
point-to-point send as soon as it is computed, before that module's own backward pass. Nothing
comes back: a purely local rule's modules need no gradient from later ones. Module i at step t
thus sees the output of module i-1 after t-1 updates, exactly as in a one-process run, so a
pipelined run of a `LocalRule` (dgl, infopro, linear and any third-party rule built on it) is
the same computation, bitwise on one thread per process.

Each stage steps the optimizer on its own parameters only (the others have no gradient, and SGD
leaves a parameter without one untouched). Every process holds the whole network; `sync` makes
every copy current (each stage's parameters, buffers and optimizer state broadcast from it) before
evaluation and checkpoints, so those, and resume, work as for a one-process run.

The step's statistics are summed over all processes with a non-blocking all-reduce and read
``lag`` steps later (a blocking one would make every stage wait for the last at every step):
the progress bar is that many steps behind, `drain` collects the rest at the end of an epoch and
before a checkpoint, and a stop asked for on any process is seen by all at the same step. A stage
whose loss is not finite does not step its optimizer; the verdict reaches every stage ``lag``
steps later and all stop, no checkpoint being written after it.

Ranks are laid out stage-major: rank = stage * D + replica (rank 0 is stage 0, replica 0).
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from localearn import distributed as dist_
from localearn.engine.step import DataEnd
from localearn.errors import SameOnEveryRank, UserError
from localearn.interfaces import LocalRule, SplitNetwork, UpdateRule

#: dtypes an activation may travel in (the code is the header's last field)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HEADER = 8  # int64 fields: batch, ndim, shape (up to 5 dims), dtype code


class StageLost(UserError):
    """Another process of a pipelined job stopped (or could not be reached)."""


@dataclass(frozen=True)
class Layout:
    """Where a process stands: ``stages`` x ``replicas`` processes, rank = stage * D + replica."""

    stages: int
    replicas: int
    rank: int

    @property
    def stage(self) -> int:
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return stage * self.replicas + (self.replica if replica is None else replica)


def layout_of(stages: int, env: dist_.DistEnv) -> Layout:
    if not env.enabled:
        raise SameOnEveryRank(
            f"--stages {stages} runs one process per stage: start it with `localearn fit "
            f"--stages {stages}` (torchrun underneath), or under torchrun with a multiple of "
            f"{stages} processes")
    if env.world_size % stages:
        raise SameOnEveryRank(f"--stages {stages} needs a multiple of {stages} processes; "
                              f"the job has {env.world_size}")
    return Layout(stages, env.world_size // stages, env.rank)


# ----------------------------------------------------------------------------- stage cuts


def parse_stage_cuts(text: str, k: int | None, stages: int) -> list[int]:
    """``"4,9"``: the modules where stages 1.. start (strictly increasing, within 1..K-1, one
    fewer than the stages). ``k=None`` checks all but the upper bound."""
    def bad(why: str) -> SameOnEveryRank:
        return SameOnEveryRank(f"invalid --stage-cuts {text!r}: {why}")

    try:
        cuts = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise bad("expected the module indices where stages 1.. start, e.g. 4,9") from None
    if len(cuts) != stages - 1:
        raise bad(f"{stages} stages need {stages - 1} cut(s), got {len(cuts)}")
    top = k if k is not None else max(cuts, default=0) + 1
    if any(b <= a for a, b in zip([0, *cuts], [*cuts, top])):
        within = f"1..{k - 1} (K={k})" if k is not None else "1..K-1"
        raise bad(f"cuts must increase strictly within {within}, so every stage has at least "
                  "one module")
    return cuts


def balance(costs: list[float], stages: int) -> list[int]:
    """Contiguous groups of modules with the smallest largest-group cost; the modules where
    groups 1.. start."""
    k = len(costs)
    if not 1 <= stages <= k:
        raise ValueError(f"cannot make {stages} stages of {k} modules")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest max cost splitting modules 0..i-1 into s groups; cut[s][i]: its last
    # group's start
    best = [[inf] * (k + 1) for _ in range(stages + 1)]
    cut = [[0] * (k + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, k + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    starts, i = [], k
    for s in range(stages, 0, -1):
        i = cut[s][i]
        starts.append(i)
    return sorted(starts)[1:]


def _timed(fn, repeats: int = 3) -> float:
    """The median wall time of ``fn()`` after one untimed call (CUDA synchronised)."""
    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def module_costs(rule: LocalRule, net: SplitNetwork, batch: int = 32) -> list[float]:
    """The measured time of each module's forward and backward pass, its head's included, on
    a batch of random inputs (on copies, so nothing of the run changes). FLOPs would miss what
    dominates small feature maps on CPUs (batch norm, activations, memory traffic)."""
    import copy

    costs = []
    device = next(net.parameters()).device
    x = torch.randn(batch, *net.input_shape, device=device)
    targets = torch.zeros(batch, dtype=torch.long, device=device)
    images = x
    for i, module in enumerate(net.local_modules):
        mod = copy.deepcopy(module)
        head = copy.deepcopy(rule.heads[i]) if i < len(rule.heads) else None
        inp = x.detach().requires_grad_(i > 0)

        def step(mod=mod, head=head, inp=inp) -> None:
            out = mod(inp)
            loss = head.loss(out, targets, images) if head is not None else out.sum()
            loss.backward()

        costs.append(_timed(step))
        with torch.no_grad():
            x = mod(x)
    return costs


def stage_ranges(starts: list[int], k: int) -> list[range]:
    bounds = [0, *starts, k]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------- the step


def check_pipelinable(rule: UpdateRule, k: int | None, stages: int) -> UpdateRule:
    """The rule, if ``--stages`` can train it (``k=None``: not knowing K yet)."""
    from localearn.engine.pipeline_mlaan import is_cascaded

    if not (isinstance(rule, LocalRule) and rule.pipelinable) and not is_cascaded(rule):
        raise SameOnEveryRank(
            f"--stages trains rules whose step is LocalRule's (dgl, infopro, linear and rules "
            f"built on LocalRule.module_loss) and MLAAN's (mlaan, mlm, lam, man, hpff); "
            f"{rule.expression} is neither: train it without --stages")
    if k is not None and k < stages:
        raise SameOnEveryRank(f"--stages {stages} needs at least {stages} local modules; "
                              f"{rule.expression} trains K={k}")
    return rule


def _send_tensors(tensors: list[Tensor], dst: int) -> list[Any]:
    return [dist.isend(t, dst) for t in tensors]


class PipelineStep:
    """The engine's step for one stage of a pipelined run (replaces `TrainStep`)."""

    def __init__(self, rule: LocalRule, net: SplitNetwork, aux: nn.Module,
                 optimizer: torch.optim.Optimizer, device: torch.device, layout: Layout,
                 starts: list[int], precision: str = "32") -> None:
        from localearn.engine.step import EngineContext

        self.rule, self.net, self.aux, self.optimizer = rule, net, aux, optimizer
        self.device, self.layout, self.precision = device, layout, precision
        self.starts = starts
        self.ranges = stage_ranges(starts, net.k)
        self.mine = self.ranges[layout.stage]
        self.first = layout.stage == 0
        convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        self.channels_last = bool(convs) and not convs[0].is_contiguous() and \
            convs[0].is_contiguous(memory_format=torch.channels_last)
        self.last = layout.stage == layout.stages - 1
        self.lag = layout.stages
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")
        # groups: every process makes every group, in the same order
        self.groups = [dist.new_group([layout.rank_of(s, r) for r in range(layout.replicas)])
                       for s in range(layout.stages)] if layout.replicas > 1 else []
        group = self.groups[layout.stage] if self.groups else None
        owned = self.owned_params(layout.stage)
        self.reducer = dist_.GradReducer(owned, layout.replicas, group=group) \
            if layout.replicas > 1 else None
        self.ctx = EngineContext(self.scaler, self.reducer)
        self.stop_vote = False
        self.stop_requested = False
        self._stats: deque[tuple[Any, Tensor]] = deque()
        self._sends: deque[Any] = deque()
        self.waited = 0.0  # seconds spent blocked on other stages
        self.busy = 0.0  # seconds in steps

    @property
    def receives_batches(self) -> bool:
        """Later stages read no data: each batch arrives with the activations from stage 0."""
        return not self.first

    # -- which module owns what
    def owned_modules(self, stage: int) -> list[nn.Module]:
        out: list[nn.Module] = []
        for i in self.ranges[stage]:
            out.append(self.net.local_modules[i])
            if i < len(self.rule.heads):
                out.append(self.rule.heads[i])
        return out

    def owned_extras(self, stage: int) -> list[nn.Parameter]:
        """Parameters of ``stage`` outside its modules (none here)."""
        return []

    def owned_params(self, stage: int) -> list[nn.Parameter]:
        params = [p for m in self.owned_modules(stage) for p in m.parameters()]
        return [p for p in [*params, *self.owned_extras(stage)] if p.requires_grad]

    # -- communication
    def _peer(self, stage: int) -> int:
        return self.layout.rank_of(stage)

    def _lost(self, exc: Exception, what: str) -> StageLost:
        text = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\]\s*", "", str(exc)).strip()  # Gloo's source line
        first = text.splitlines()[0] if text else type(exc).__name__
        return StageLost(f"stage {self.layout.stage} (rank {self.layout.rank}) lost its peer "
                         f"while {what} ({first[:160]}): another process of this pipelined job "
                         "stopped; every stage stops")

    def _receive(self) -> tuple[Tensor, Tensor, Tensor]:
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
            x = torch.empty(shape, dtype=dtype, device=self.device)
            images = torch.empty(int(header[0]), *self.net.input_shape, device=self.device)
            targets = torch.empty(int(header[0]), dtype=torch.long, device=self.device)
            for t in (x, images, targets):
                dist.recv(t, src)
        except RuntimeError as exc:
            raise self._lost(exc, "receiving activations") from None
        self.waited += time.perf_counter() - start
        return self.same_format(x), self.same_format(images), targets

    def same_format(self, t: Tensor) -> Tensor:
        """Tensors travel contiguous; a channels-last run gets its 4-D ones back in that
        layout (as in one process, where nothing is converted)."""
        if self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def end_of_data(self) -> None:
        """Tell the next stage (which passes it on) that this epoch's stream ended before its
        planned batches: a header for a batch of 0 images."""
        if self.last:
            return
        header = torch.zeros(HEADER, dtype=torch.long)
        try:
            self._sends.append(_send_tensors([header], self._peer(self.layout.stage + 1)))
        except RuntimeError as exc:
            raise self._lost(exc, "sending the end of the data") from None

    def _send(self, x: Tensor, images: Tensor, targets: Tensor) -> None:
        dst = self._peer(self.layout.stage + 1)
        x = x.detach().contiguous()
        header = torch.zeros(HEADER, dtype=torch.long)
        header[0], header[1] = len(targets), x.dim()
        header[2:2 + x.dim()] = torch.tensor(x.shape)
        header[-1] = DTYPES.index(x.dtype)
        try:
            self._sends.append(_send_tensors([header, x, images.contiguous(), targets], dst))
            while len(self._sends) > self.lag:  # bounded: at most `lag` batches in flight
                for work in self._sends.popleft():
                    work.wait()
        except RuntimeError as exc:
            raise self._lost(exc, "sending activations") from None

    # -- one step
    def __call__(self, images: Tensor, targets: Tensor) -> list[float]:
        from localearn.engine.step import autocast, optimizer_step

        began = time.perf_counter()
        x = images
        if not self.first:  # first: `DataEnd` leaves this step before it changes anything
            x, images, targets = self._receive()
        self.optimizer.zero_grad(set_to_none=True)
        if self.reducer is not None:
            self.reducer.start()
        local: dict[int, Tensor] = {}
        loss = logits = None
        with autocast(self.device, self.precision):
            for i in self.mine:
                loss, out = self.rule.module_loss(self.net, i, x, images, targets)
                if i == self.mine[-1] and not self.last:
                    self._send(out, images, targets)  # before this module's backward
                self.ctx.backward(loss)
                params = list(self.net.local_modules[i].parameters())
                if i < len(self.rule.heads):
                    params += list(self.rule.heads[i].parameters())
                    local[i] = loss.detach()
                self.ctx.grads_ready(params)
                x, logits = out, out
        if self.reducer is not None:
            self.reducer.finish()
        stats = self._stats_vector(local, loss, logits, targets)
        if self._may_step(stats):
            optimizer_step(self.scaler, self.optimizer)
            self.rule.after_step()
        return self._post_stats(stats, began)

    def _may_step(self, stats: Tensor) -> bool:
        """No stage steps on a non-finite loss; the replicas of a stage agree on it."""
        bad = stats[-2] > 0
        if self.layout.replicas > 1:
            flag = stats[-2:-1].clone()
            dist.all_reduce(flag, group=self.groups[self.layout.stage])
            bad = flag.item() > 0
        return not bool(bad)

    def _post_stats(self, stats: Tensor, began: float) -> list[float]:
        """Start summing this step's statistics; the totals of the step ``lag`` steps back
        (zeros while the pipeline fills)."""
        try:
            self._stats.append((dist.all_reduce(stats, async_op=True), stats))
        except RuntimeError as exc:
            raise self._lost(exc, "summing statistics") from None
        totals = [0.0] * (len(stats) - 2)
        if len(self._stats) > self.lag:
            totals = self._read(*self._stats.popleft())
        self.busy += time.perf_counter() - began  # the whole step, its waits included
        return totals

    def _stats_vector(self, local: dict[int, Tensor], loss: Tensor | None,
                      logits: Tensor | None, targets: Tensor) -> Tensor:
        """``[loss*n, correct, n, local_0*n .. local_{K-2}*n, non-finite, stop]``, this
        stage's entries filled, the others zero."""
        k = self.net.k
        v = torch.zeros(3 + (k - 1) + 2, dtype=torch.float64, device=self.device)
        n = float(len(targets))
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, value in local.items():
            v[3 + i] = value.double() * n
            bad += (~torch.isfinite(value)).double()
        if self.last and loss is not None and logits is not None:
            v[0] = loss.detach().double() * n
            v[1] = (logits.argmax(1) == targets).sum().double()
            v[2] = n
            bad += (~torch.isfinite(loss.detach())).double()
        v[-2] = bad
        v[-1] = float(self.stop_vote)
        return v

    def _read(self, work: Any, stats: Tensor) -> list[float]:
        from localearn.engine.step import NonFiniteLoss

        start = time.perf_counter()
        try:
            work.wait()
        except RuntimeError as exc:
            raise self._lost(exc, "summing statistics") from None
        self.waited += time.perf_counter() - start
        totals = stats.tolist()
        self.stop_requested = self.stop_requested or totals.pop() > 0
        if totals.pop():
            raise NonFiniteLoss(float("nan"))
        return totals

    def drain(self) -> list[float] | None:
        """The summed statistics of the steps not read yet (None if there are none); waits for
        every activation in flight."""
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

    # -- make every process's copy whole
    def sync(self) -> None:
        """Every process gets each stage's parameters, buffers and optimizer state from that
        stage's first replica (BatchNorm statistics averaged over the stage's replicas
        first)."""
        try:
            if self.layout.replicas > 1:
                group = self.groups[self.layout.stage]
                for m in self.owned_modules(self.layout.stage):
                    dist_.average_buffers(m, self.layout.replicas, group=group)
            for stage in range(self.layout.stages):
                self._broadcast_stage(stage)
        except RuntimeError as exc:
            raise self._lost(exc, "bringing the stages' weights together") from None

    def _broadcast_stage(self, stage: int) -> None:
        src = self.layout.rank_of(stage, 0)
        mine = self.layout.rank == src
        modules = self.owned_modules(stage)
        extras = self.owned_extras(stage)
        params = [p for m in modules for p in m.parameters()] + extras
        tensors = [t.data for m in modules for t in [*m.parameters(), *m.buffers()]]
        tensors += [p.data for p in extras]
        # the optimizer's per-parameter state: names and plain values travel as an object
        keys = None
        if mine:
            keys = [{name: (tuple(v.shape), v.dtype) if isinstance(v, Tensor) else v
                     for name, v in self.optimizer.state.get(p, {}).items()} for p in params]
        box = [keys]
        dist.broadcast_object_list(box, src)
        keys = box[0]
        for p, entry in zip(params, keys):
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

    def idle_fraction(self) -> float:
        return self.waited / self.busy if self.busy else 0.0


def pipeline_step(cfg: Any, rule: UpdateRule, net: SplitNetwork, aux: nn.Module,
                  optimizer: torch.optim.Optimizer, device: torch.device,
                  env: dist_.DistEnv) -> PipelineStep:
    """The `PipelineStep` of this process for ``cfg.stages`` stages (cut by ``cfg.stage_cuts``
    or balanced by measured time)."""
    from localearn.engine import pipeline_mlaan

    layout = layout_of(cfg.stages, env)
    cascaded = pipeline_mlaan.is_cascaded(rule)
    if cascaded:
        pipeline_mlaan.check_cascaded(rule, cfg.precision)
    check_pipelinable(rule, net.k, cfg.stages)
    if cfg.stage_cuts:
        starts = parse_stage_cuts(cfg.stage_cuts, net.k, cfg.stages)
    else:  # timed on rank 0 (times differ between processes), the same cuts everywhere
        starts = None
        if env.is_main:
            batch = min(cfg.batch_size, 128)
            costs = pipeline_mlaan.module_costs(rule, net, batch) if cascaded else \
                module_costs(rule, net, batch)
            starts = balance(costs, cfg.stages)
        starts = dist_.broadcast_object(starts, env)
    if cascaded:
        return pipeline_mlaan.MLAANStageStep(rule, net, aux, optimizer, device, layout, starts,
                                             cfg.precision, cfg.stage_mode)
    return PipelineStep(rule, net, aux, optimizer, device, layout, starts, cfg.precision)
