"""MLAAN's training step (`MLAANStep`, mixed into `MLAAN`): each module runs forward once, and
every loss's gradient is routed back through the modules its cascade reaches, each module's
graph freed at its last use; ``fuse`` takes each module's weight gradient in one pass,
``recompute`` keeps no module graph and runs a module again for each backward through it.

What the step keeps is freed as early as the cascades allow: a cascade's LAM and head run
before module i's independent head, whose gradient is then kept as the start of module i's
summed output gradient (not beside it), and a cascade's gradient is dropped once no module
below needs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from localearn.interfaces import SplitNetwork, StepContext, StepResult, cross_entropy


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class MLAANStep:
    """`MLAAN.train_step` and the backward routing it does (`_route`, `_route_lean`,
    `_backward_module`). It reads what `MLAAN.setup` made (``cascades``, the heads, the LAMs)
    and calls the stage hooks of `localearn_plugins.mlaan_stages.MLAANStages`."""

    def _head_grad(self, name: str, loss: Tensor, leaf: Tensor) -> Tensor:
        """Back-propagate a head-side loss to its detached leaf; the leaf's gradient returns."""
        self.trace.append(name)
        self._ctx.backward(loss)
        grad, leaf.grad = leaf.grad, None
        return grad

    def train_step(self, ctx: StepContext, net: SplitNetwork, images: Tensor,
                   targets: Tensor) -> StepResult:
        K = net.k
        mine = ctx.modules(K)  # all K in one process; a pipelined stage's own range
        self._ctx = ctx
        self.trace = []
        ins: list[Tensor | None] = [None] * K  # detached input of each module (a leaf)
        outs: list[Tensor | None] = [None] * K  # each module's output, graph kept while needed
        pending: list[Tensor | None] = [None] * K  # independent-loss gradient at each output
        local: list[Tensor] = []
        self._rng: dict[int, tuple] = {}
        self._acc: list[Tensor | None] = [None] * K  # summed output gradients (`_route_lean`)
        # async stages: modules the next stage's cascades reach a step late run on copies of
        # their parameters, so that their graph outlives this step's update
        late = self.late_modules(mine, K) if ctx.stage_mode == "async" else set()
        self._param_map: dict[int, list[Tensor]] = {}
        lean = self.fuse and not self.recompute  # `_route_lean`: summed output gradients
        x, final, o = images, None, None
        for i in mine:
            module = net.local_modules[i]
            a = ctx.enter(i, x).detach().requires_grad_(i > 0)
            if self.recompute:  # no graph now: each backward through module i rebuilds it
                self._rng[i] = _rng_state(a.device)  # so dropout draws the same masks again
                with torch.no_grad():
                    o = module(a)
            elif i in late:
                names, params = zip(*module.named_parameters())
                copies = [q.detach().clone().requires_grad_(q.requires_grad) for q in params]
                o = torch.func.functional_call(module, dict(zip(names, copies)), (a,),
                                               strict=False)
                self._param_map[i] = copies
            else:
                o = module(a)
            ins[i], outs[i] = a, None if self.recompute else o
            ctx.leave(i, o)  # on to the next stage, before any backward through module i
            leaf = o.detach().requires_grad_()
            if i < K - 1:
                c = self._position.get(i)
                # the cascade's gradient at module i's output, in a list that `_route` empties
                # (so that it is freed once no module below needs it)
                routed: list[Tensor] = []
                if c is not None:  # the LAM first, while module i has no gradient kept
                    cascade = self.cascade_heads[c].loss(self.lam_forward(i, leaf), targets,
                                                         images)
                    routed.append(self._head_grad(f"cascade {i}", self.wy * cascade, leaf))
                indep = leaf.new_zeros(())  # stays 0 without independent heads (MAN)
                own = list(self.heads[i].parameters()) if self.independent else []
                if self.independent:
                    indep = self.heads[i].loss(leaf, targets, images)
                    pending[i] = self._head_grad(f"independent {i}", self.wx * indep, leaf)
                if self.independent and not self.fuse:  # its own backward, for tracing
                    self._backward_module(net, f"independent {i}", i, pending[i], False, False,
                                          ins, outs)
                    pending[i] = None
                if lean:  # the start of module i's summed output gradient
                    self._acc[i], pending[i] = pending[i], None
                if c is None:  # ends no cascade: the independent loss alone, module i waits
                    ctx.grads_ready(own)
                    local.append((self.wx * indep).detach())
                    x = o.detach()
                    continue
                ctx.grads_ready([*own, *self.cascade_heads[c].parameters(),
                                 *self.lam_parameters(c)])
                local.append((self.wx * indep + self.wy * cascade).detach())
                self._route(net, f"cascade {i}", i, routed.pop(), ins, outs, pending,
                            mine.start)
            else:
                final = cross_entropy(leaf, targets)
                self._route(net, "final", i, self._head_grad("final", final, leaf), ins, outs,
                            pending, mine.start)
            x = o.detach()  # module i's graph lives in outs[i] only, freed there
        self._from_next_stage(net, mine, (ins, outs, pending, self._acc, o, self._param_map))
        self._public_twins(mine)  # twins=public_*: every backward done, the optimizer step not
        self._ctx, self._param_map = None, {}
        last = mine.stop == K
        return StepResult(loss=final.detach() if last else None,
                          logits=o.detach() if last else None, local_losses=local)


    def _route(self, net: SplitNetwork, name: str, i: int, grad: Tensor, ins: list,
               outs: list, pending: list, bottom: int = 0) -> None:
        """Send cascade i's gradient at module i's output back through modules
        max(0, i-k+1)..i, freeing each module's graph at its last use (on a pipelined stage,
        down to its first module ``bottom``; what goes on below is sent back)."""
        if self.fuse and not self.recompute:
            box = [grad]
            del grad  # `_route_lean` holds the only reference and frees it when it can
            back = self._route_lean(net, name, i, box.pop(), ins, outs, pending, bottom=bottom)
            if back is not None:
                self._ctx.send_back(back)
            return
        K, start = net.k, max(0, i - self.k + 1)
        for j in range(i, start - 1, -1):
            last = i == min(j + self.k - 1, K - 1)
            go_on = j > start
            if last and pending[j] is not None:
                if go_on:  # the independent gradient must not travel further: its own pass
                    self._backward_module(net, f"independent {j}", j, pending[j], False, False,
                                          ins, outs)
                else:
                    grad = grad + pending[j]
                pending[j] = None
            grad = self._backward_module(net, name, j, grad, go_on, last, ins, outs)
            if last:
                ins[j] = outs[j] = None  # free module j's graph
                self._ctx.grads_ready(list(net.local_modules[j].parameters()))

    def _route_lean(self, net: SplitNetwork, name: str, i: int, grad: Tensor, ins: list,
                    outs: list, pending: list, bottom: int = 0,
                    top: int | None = None) -> Tensor | None:
        """`_route` with each module's weight gradient taken once: a weight gradient is linear
        in the gradient at the module's output, so the gradients every loss sends to module j
        are summed (``self._acc[j]``) and its parameters get one backward pass at j's last use;
        before that, a cascade that goes on past j needs only the gradient at j's input (a
        pass that skips the weight gradients). Per module: k-1 input-gradient passes and one
        weight-gradient pass, instead of k passes computing both.

        Pipelined stages route the part of a cascade in their modules ``bottom..top`` (``grad``
        is then the gradient at module ``top``'s output); the gradient at module ``bottom``'s
        input returns when the cascade goes on below it (to the previous stage), else None."""
        K, start = net.k, max(0, i - self.k + 1)
        acc = self._acc
        for j in range(i if top is None else min(i, top), max(start, bottom) - 1, -1):
            self.trace.append(f"{name} @ module {j}")
            last = i == min(j + self.k - 1, K - 1)
            go_on = j > start
            acc[j] = grad if acc[j] is None else acc[j] + grad
            if go_on:  # the gradient at j's input only (autograd skips the weight gradients)
                self._ctx.backward_from(outs[j], grad, inputs=[ins[j]], retain_graph=True)
                g, ins[j].grad = ins[j].grad, None
            if last:
                if pending[j] is not None:
                    acc[j] = acc[j] + pending[j]
                    pending[j] = None
                real = list(net.local_modules[j].parameters())
                # an async stage may run module j on copies of its parameters (so that the
                # graph outlives an optimizer step): their gradients go to the parameters
                used = self._param_map.pop(j, None) or real
                self._ctx.backward_from(outs[j], acc[j], inputs=used)
                if used is not real:
                    for q, c in zip(real, used):
                        q.grad = c.grad if q.grad is None else q.grad + c.grad
                ins[j] = outs[j] = acc[j] = None  # free module j's graph
                self._ctx.grads_ready(list(net.local_modules[j].parameters()))
            grad = g if go_on else None  # not needed below module j: freed now
        return grad if start < bottom else None

    def _backward_module(self, net: SplitNetwork, name: str, j: int, grad: Tensor,
                         go_on: bool, last: bool, ins: list, outs: list) -> Tensor | None:
        """One backward pass through module j; returns the gradient at its input if asked."""
        self.trace.append(f"{name} @ module {j}")
        a, out, module = ins[j], outs[j], net.local_modules[j]
        keep = not last
        saved = None
        if out is None:  # recompute: the same forward again, BatchNorm statistics put back
            saved = [b.clone() for b in module.buffers()]
            with torch.random.fork_rng(devices=[a.device] if a.device.type == "cuda" else []):
                _set_rng_state(a.device, self._rng[j])
                out, keep = module(a), False
        params = list(module.parameters())
        targets = [*params, a] if go_on else params
        self._ctx.backward_from(out, grad, inputs=targets, retain_graph=keep)
        if saved is not None:  # after the backward, which checks the buffers' versions
            with torch.no_grad():
                for b, old in zip(module.buffers(), saved):
                    b.copy_(old)
        if not go_on:
            return None
        g, a.grad = a.grad, None
        return g
