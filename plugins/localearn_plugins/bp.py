"""BP: plain end-to-end back-propagation, the baseline every local rule is measured against."""

from __future__ import annotations

from torch import Tensor, nn

from localearn.errors import UserError
from localearn.interfaces import SplitNetwork, StepContext, StepResult, UpdateRule


class BP(UpdateRule):
    """End-to-end back-propagation (one module, K=1)."""

    description = "end-to-end back-propagation through the whole network (K=1)"

    def num_modules(self, requested: int | None, num_units: int) -> int:
        if requested not in (None, 1):
            raise UserError(f"rule 'bp' trains end to end, so K must be 1 (got K={requested}); "
                            "drop --k or use a local rule such as dgl")
        return 1

    def train_step(self, ctx: StepContext, net: SplitNetwork, images: Tensor,
                   targets: Tensor) -> StepResult:
        logits = net(images)
        loss = nn.functional.cross_entropy(logits, targets)
        ctx.backward(loss)
        ctx.grads_ready(net.parameters())
        return StepResult(loss=loss.detach(), logits=logits.detach())
