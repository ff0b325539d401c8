"""MLAAN on pipelined stages (`MLAANStages`, mixed into `MLAAN`): which cascades cross a stage
boundary, routing their gradients from the next stage (``sync``: this step's; ``async``: the
previous step's, through the graphs kept for them), and the parts each stage holds and reads.
"""

from __future__ import annotations

from torch import nn

from localearn.interfaces import SplitNetwork, StepContext


class MLAANStages:
    """The stage hooks of `MLAAN` (`incoming`, `late_modules`, `flush`, `stage_check`,
    `units_read`, `stage_parts`); the routing itself is `MLAANStep._route_lean`."""

    def incoming(self, modules: range, num_modules: int) -> list[int]:
        """The cascades (by the module that ends them; K-1: the final loss) that end after
        ``modules`` but reach into them: their gradients come back from the next stage."""
        k, b = self.k, modules.stop
        if b >= num_modules:
            return []
        return [e for e in [*self.cascades, num_modules - 1] if e >= b and e - k + 1 < b]

    def late_modules(self, modules: range, num_modules: int) -> set[int]:
        """The modules of ``modules`` that the next stage's cascades reach (in async mode,
        a step late)."""
        return {j for e in self.incoming(modules, num_modules)
                for j in range(max(modules.start, e - self.k + 1), modules.stop)}

    def _from_next_stage(self, net: SplitNetwork, mine: range, state: tuple) -> None:
        """Route the next stage's cascades that reach back into this one, in order: this
        step's (sync), or the previous step's through its kept graphs (async)."""
        incoming = self.incoming(mine, net.k)
        if not incoming:
            return
        if self._ctx.stage_mode == "sync":
            return self._route_incoming(net, mine, incoming, state)
        previous, self._late = getattr(self, "_late", None), state
        if previous is not None:
            now = self._acc, self._param_map
            self._route_incoming(net, mine, incoming, previous)
            self._acc, self._param_map = now

    def _route_incoming(self, net: SplitNetwork, mine: range, incoming: list[int],
                        state: tuple) -> None:
        ins, outs, pending, self._acc, like, self._param_map = state
        for e in incoming:
            grad = self._ctx.take_back(like)
            name = "final" if e == net.k - 1 else f"cascade {e}"
            back = self._route_lean(net, name, e, grad, ins, outs, pending,
                                    bottom=mine.start, top=mine.stop - 1)
            if back is not None:
                self._ctx.send_back(back)

    def flush(self, ctx: StepContext) -> None:
        """Async: the gradients the next stage sent for the last step are taken and dropped,
        so that every stage is at the same point."""
        previous, self._late = getattr(self, "_late", None), None
        if previous is not None:
            for _ in self.incoming(ctx.modules(len(previous[0])), len(previous[0])):
                ctx.take_back(previous[4])

    def stage_check(self, ranges: list[range], mode: str, precision: str) -> str | None:
        if self.recompute or not self.fuse:
            return (f"{self.expression} trains on stages with its default step: drop "
                    "recompute=true and fuse=false")
        if precision == "16":
            return (f"{self.expression} trains on stages in precision 32 or bf16 (fp16's "
                    "gradient scaler is not carried across stages)")
        if mode == "async":
            for s, r in enumerate(ranges[:-1]):
                if len(r) < self.k - 1:
                    return (f"--stage-mode async needs every stage but the last to hold at "
                            f"least k-1={self.k - 1} modules (so a cascade crosses one "
                            f"boundary at most); stage {s} holds {len(r)}: change "
                            "--stage-cuts or use sync mode")
        return None

    def _twin_keys_of(self, i: int) -> list[str]:
        c = self._position.get(i)
        return [] if c is None else [k for k in self.twin_keys[c] if k is not None]

    def _twins_of(self, i: int) -> list[int]:
        return [self.twin_blocks[k] for k in self._twin_keys_of(i)]

    def units_read(self, modules: range) -> list[int]:
        """The real blocks behind the EMA twins these modules' LAMs read."""
        return sorted({b for i in modules for b in self._twins_of(i)})

    def stage_parts(self, modules: range) -> list[nn.Module | nn.Parameter]:
        out: list[nn.Module | nn.Parameter] = []
        for i in modules:
            if self.independent and i < len(self.heads):
                out.append(self.heads[i])
            c = self._position.get(i)
            if c is not None:
                out += [self.cascade_heads[c], self.copies[c]]
                copied = {id(p) for p in self.copies[c].parameters()}
                out += [p for p in self.lam_parameters(c) if id(p) not in copied]
        keys = dict.fromkeys(k for i in modules for k in self._twin_keys_of(i))
        return out + [self.twins[k] for k in sorted(keys, key=lambda k: (self.twin_blocks[k], k))]
