"""MLAAN (and the rules built on it: man, hpff) across pipelined stages, in ``sync`` mode.

A cascade of depth k that ends at module i trains modules i-k+1..i; when those modules live on
two stages, the part of its gradient that reaches the first module of the later stage is sent
back to the previous stage, which routes it on through its own modules before its optimizer
step (backward locking, bounded: at most k-1 modules of the later stage are waited for). A
leap-augmented module whose EMA twin follows a real block of a later stage gets that block's
parameters and buffers from its stage after every optimizer step, and the twin is moved then,
as in one process. Every gradient, twin and statistic is the one-process run's, so a run in
this mode ends bitwise equal to it (one thread per process): `tests/test_pipeline.py`.

The price is the waiting: a stage finishes step t only after the next stage has run the
cascades that reach back into it, and starts step t+1 only once the next stage has stepped, so
stages overlap little. Purely local rules (`PipelineStep`) do not wait at all.

Messages between stage s and s+1, per step, in this order: activations forward (s to s+1);
the gradients of the cascades that cross the boundary, in the order their cascades end (s+1 to
s); the real blocks behind stage s's twins, after stage s+1's optimizer step (s+1 to s).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from localearn.engine.pipeline import Layout, PipelineStep
from localearn.errors import SameOnEveryRank
from localearn.interfaces import SplitNetwork, UpdateRule


def is_cascaded(rule: UpdateRule) -> bool:
    """True for MLAAN and the rules built on it (their step routes cascades)."""
    return hasattr(rule, "cascades") and hasattr(rule, "_route_lean")


def check_cascaded(rule: UpdateRule, precision: str = "32") -> None:
    if getattr(rule, "recompute", False) or not getattr(rule, "fuse", True):
        raise SameOnEveryRank(f"--stages trains {rule.expression} with its default step: drop "
                              "recompute=true and fuse=false")
    if precision == "16":
        raise SameOnEveryRank(f"--stages trains {rule.expression} in precision 32 or bf16 "
                              "(fp16's gradient scaler is not carried across stages)")


def module_costs(rule, net: SplitNetwork, batch: int = 32) -> list[float]:
    """The measured time of what each module costs in a step: its forward and backward pass
    with its heads and leap-augmented module, plus k-1 forward times for the input-gradient
    passes of the cascades that go on past it. Timed on copies of the rule and network, so
    nothing of the run changes."""
    import copy

    from localearn.engine.pipeline import _timed

    rule, net = copy.deepcopy((rule, net))
    x = torch.randn(batch, *net.input_shape, device=next(net.parameters()).device)
    targets = torch.zeros(batch, dtype=torch.long, device=x.device)
    images, costs = x, []
    for i, module in enumerate(net.local_modules):
        inp = x.detach().requires_grad_(i > 0)

        def step(i=i, module=module, inp=inp) -> None:
            out = module(inp)
            loss = out.float().mean() if i == net.k - 1 else out.new_zeros(())
            if rule.independent and i < len(rule.heads):
                loss = loss + rule.heads[i].loss(out, targets, images)
            c = rule._position.get(i)
            if c is not None:
                loss = loss + rule.cascade_heads[c].loss(rule.lam_forward(i, out), targets,
                                                         images)
            loss.backward()

        with torch.no_grad():
            forward = _timed(lambda module=module, x=x: module(x))
        costs.append(_timed(step) + (rule.k - 1) * forward)
        with torch.no_grad():
            x = module(x)
    return costs


class MLAANStageStep(PipelineStep):
    """One stage of a pipelined MLAAN run (sync mode)."""

    def __init__(self, rule, net: SplitNetwork, aux: nn.Module,
                 optimizer: torch.optim.Optimizer, device: torch.device, layout: Layout,
                 starts: list[int], precision: str = "32", mode: str = "sync") -> None:
        self.mode = mode
        self._posted: deque[tuple[int, Any, Tensor]] = deque()
        self._step_no = 0
        self._prev: tuple | None = None  # async: the last step's graphs the next stage reaches
        self._unit_module = {u: i for i, r in enumerate(net.unit_ranges) for u in r}
        super().__init__(rule, net, aux, optimizer, device, layout, starts, precision)
        a, b = self.mine[0], self.mine[-1] + 1
        self.first_module, self.end_module = a, b
        k, K = rule.k, net.k
        # cascades (and the final loss) that end on the next stage but reach into this one
        ends = [*rule.cascades, K - 1]
        self.incoming = [e for e in ends if e >= b and e - k + 1 < b] if not self.last else []
        # the modules those cascades reach (their weight gradients come from the next stage)
        self.late = {j for e in self.incoming for j in range(max(a, e - k + 1), b)}
        # the twins this stage's LAMs read, and the stage each one's real block lives on
        self.my_twins = sorted({b_ for i in self.mine for b_ in self._twins_of(i)})
        self.twin_source = {t: self.stage_of(self._unit_module[t]) for t in self.my_twins}
        # what this stage sends after its optimizer step: real blocks behind earlier twins
        self.twin_targets: dict[int, list[int]] = {}  # stage -> units, in order
        for stage in range(layout.stages):
            if stage == layout.stage:
                continue
            for t in self._stage_twins(stage):
                if self.stage_of(self._unit_module[t]) == layout.stage:
                    self.twin_targets.setdefault(stage, []).append(t)
        if mode == "async":
            for s_, r in enumerate(self.ranges[:-1]):
                if len(r) < k - 1:
                    raise SameOnEveryRank(
                        f"--stage-mode async needs every stage but the last to hold at least "
                        f"k-1={k - 1} modules (so a cascade crosses one boundary at most); "
                        f"stage {s_} holds {len(r)}: change --stage-cuts or use sync mode")

    # -- ownership
    def stage_of(self, module: int) -> int:
        return next(s for s, r in enumerate(self.ranges) if module in r)

    def _twins_of(self, i: int) -> list[int]:
        rule = self.rule
        c = rule._position.get(i)
        if c is None:
            return []
        blocks = rule.blocks[c]
        return [b for j, b in enumerate(blocks)
                if (j == 0 or rule.ema_blocks == "all") and str(b) in rule.twins]

    def _stage_twins(self, stage: int) -> list[int]:
        return sorted({t for i in self.ranges[stage] for t in self._twins_of(i)})

    def owned_modules(self, stage: int) -> list[nn.Module]:
        rule, out = self.rule, []
        for i in self.ranges[stage]:
            out.append(self.net.local_modules[i])
            if rule.independent and i < len(rule.heads):
                out.append(rule.heads[i])
            c = rule._position.get(i)
            if c is not None:
                out += [rule.cascade_heads[c], rule.copies[c]]
        # a twin is kept by the first stage that reads it
        for t in self._stage_twins(stage):
            if all(t not in self._stage_twins(s) for s in range(stage)):
                out.append(rule.twins[str(t)])
        return out

    def owned_extras(self, stage: int) -> list[nn.Parameter]:
        # MAN++'s learnable scale s, one per cascade, goes with its cascade
        if not getattr(self.rule, "learn_scale", False):
            return []
        rule = self.rule
        return [rule.scales[rule._position[i]] for i in self.ranges[stage]
                if i in rule._position]

    # -- messages
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

    def _send_grad(self, grad: Tensor) -> None:
        self._post(grad.detach().contiguous(), self.layout.stage - 1,
                   "sending a cascade's gradient back")

    def _recv_like(self, like: Tensor, stage: int, what: str) -> Tensor:
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        try:
            dist.recv(out, self._peer(stage))
        except RuntimeError as exc:
            raise self._lost(exc, what) from None
        return self.same_format(out)

    def _block_tensors(self, unit: int) -> list[Tensor]:
        block = self.net.units[unit]
        return [t.data for t in [*block.parameters(), *block.buffers()]]

    def _send_blocks(self) -> None:
        for stage, units in self.twin_targets.items():
            flat = torch.cat([t.reshape(-1).double() for u in units
                              for t in self._block_tensors(u)])
            self._post(flat, stage, "sending real blocks for EMA twins")

    def _recv_blocks(self, apply: bool = True) -> None:
        by_stage: dict[int, list[int]] = {}
        for t in self.my_twins:
            if self.twin_source[t] != self.layout.stage:
                by_stage.setdefault(self.twin_source[t], []).append(t)
        for stage, units in sorted(by_stage.items()):
            tensors = [t for u in units for t in self._block_tensors(u)]
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float64,
                               device=self.device)
            start = 0
            try:
                dist.recv(flat, self._peer(stage))
            except RuntimeError as exc:
                raise self._lost(exc, "receiving real blocks for EMA twins") from None
            for t in tensors:
                if apply:
                    t.copy_(flat[start:start + t.numel()].view_as(t))
                start += t.numel()

    def _incoming(self, ins: list, outs: list, pending: list, acc: list, like: Tensor) -> None:
        """Receive the gradients of the next stage's cascades that reach into this stage and
        route them on (to the previous stage too, where they go on below)."""
        rule, top = self.rule, self.end_module - 1
        for e in self.incoming:
            start = time.perf_counter()
            grad = self._recv_like(like, self.layout.stage + 1, "receiving a cascade's gradient")
            self.waited += time.perf_counter() - start
            name = "final" if e == self.net.k - 1 else f"cascade {e}"
            back = rule._route_lean(self.net, name, e, grad, ins, outs, pending,
                                    bottom=self.first_module, top=top)
            if back is not None:
                self._send_grad(back)

    def drain(self) -> list[float] | None:
        """Async: the messages of the last step still in flight are taken and dropped (that
        step's gradients from the next stage, the real blocks for the twins) so that every
        stage is at the same point; then the statistics."""
        if self.mode == "async" and self._step_no > 0:
            if self._prev is not None:
                for _ in self.incoming:
                    self._recv_like(self._prev[4], self.layout.stage + 1,
                                    "receiving a cascade's gradient")
            self._recv_blocks(apply=False)
            self._prev = None
            self._step_no = 0
        self._wait_posted(1 << 62)
        return super().drain()

    # -- one step
    def __call__(self, images: Tensor, targets: Tensor) -> list[float]:
        from localearn.engine.step import autocast, optimizer_step

        began = time.perf_counter()
        rule, net, ctx, K = self.rule, self.net, self.ctx, self.net.k
        x = images
        if not self.first:  # first: `DataEnd` leaves this step before it changes anything
            x, images, targets = self._receive()
        self.optimizer.zero_grad(set_to_none=True)
        if self.reducer is not None:
            self.reducer.start()
        rule._ctx, rule.trace = ctx, []
        ins: list = [None] * K
        outs: list = [None] * K
        pending: list = [None] * K
        rule._acc = [None] * K
        local: dict[int, Tensor] = {}
        final = o = None
        bottom = self.first_module
        with autocast(self.device, self.precision):
            rule._param_map = {}
            for i in self.mine:
                a = x.detach().requires_grad_(i > 0)
                if self.mode == "async" and i in self.late:
                    # the next stage's gradients reach module i a step late, after this
                    # step's update: its graph holds copies of the parameters as they are now
                    names, params = zip(*net.local_modules[i].named_parameters())
                    copies = [q.detach().clone().requires_grad_(q.requires_grad)
                              for q in params]
                    o = torch.func.functional_call(net.local_modules[i],
                                                   dict(zip(names, copies)), (a,), strict=False)
                    rule._param_map[i] = copies
                else:
                    o = net.local_modules[i](a)
                ins[i], outs[i] = a, o
                if i == self.mine[-1] and not self.last:
                    self._send(o, images, targets)
                leaf = o.detach().requires_grad_()
                if i < K - 1:
                    indep = leaf.new_zeros(())
                    own = list(rule.heads[i].parameters()) if rule.independent else []
                    if rule.independent:
                        indep = rule.heads[i].loss(leaf, targets, images)
                        pending[i] = rule._head_grad(f"independent {i}", rule.wx * indep, leaf)
                    c = rule._position.get(i)
                    if c is None:
                        ctx.grads_ready(own)
                        local[i] = (rule.wx * indep).detach()
                        x = o.detach()
                        continue
                    leaf = o.detach().requires_grad_()
                    cascade = rule.cascade_heads[c].loss(rule.lam_forward(i, leaf), targets,
                                                         images)
                    grad = rule._head_grad(f"cascade {i}", rule.wy * cascade, leaf)
                    ctx.grads_ready([*own, *rule.cascade_heads[c].parameters(),
                                     *rule.lam_parameters(c)])
                    local[i] = (rule.wx * indep + rule.wy * cascade).detach()
                    back = rule._route_lean(net, f"cascade {i}", i, grad, ins, outs, pending,
                                            bottom=bottom)
                else:
                    final = nn.functional.cross_entropy(leaf, targets)
                    grad = rule._head_grad("final", final, leaf)
                    back = rule._route_lean(net, "final", i, grad, ins, outs, pending,
                                            bottom=bottom)
                if back is not None:
                    self._send_grad(back)
                x = o.detach()
            # the cascades of the next stage that reach back into this one, in order: this
            # step's (sync), or the previous step's through its kept graphs (async)
            if self.mode == "sync":
                self._incoming(ins, outs, pending, rule._acc, o)
            else:
                if self._prev is not None:
                    now = rule._acc, rule._param_map
                    rule._acc, rule._param_map = self._prev[3], self._prev[5]
                    self._incoming(*self._prev[:5])
                    rule._acc, rule._param_map = now
                self._prev = ((ins, outs, pending, rule._acc, o, rule._param_map)
                              if self.incoming else None)
        rule._ctx = None
        rule._param_map = {}
        if self.reducer is not None:
            self.reducer.finish()
        stats = self._stats_vector(local, final, o if self.last else None, targets)
        step = self._may_step(stats)
        if step:
            optimizer_step(self.scaler, self.optimizer)
        self._send_blocks()  # the real blocks behind earlier stages' twins, as stepped
        start = time.perf_counter()
        if self.mode == "sync" or self._step_no > 0:  # async: those of the previous step
            self._recv_blocks()
        self.waited += time.perf_counter() - start
        if step:
            rule.after_step()
        self._step_no += 1
        self._wait_posted(self._step_no - 1)
        return self._post_stats(stats, began)
