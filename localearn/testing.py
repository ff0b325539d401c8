"""Checks a plugin author runs in their own tests: `check_isolation`.

Gradient isolation is what makes a rule local: the gradient a local module receives depends on
the modules before it (they make its input) and on its own auxiliary networks, never on the
modules after it. The check reads this straight off the gradients of one real training step,
whatever the rule does inside ``train_step``: every module after a cut is perturbed, the step is
run again from the same state, and every module before the cut must get exactly the same
gradient. A rule whose losses deliberately train a window of modules (MLAAN's cascades of depth
k) states its ``reach``: module i's gradient may then depend on modules up to i + reach - 1.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from localearn.interfaces import DataInfo, PlainContext, SplitNetwork, UpdateRule

#: the synthetic data the check trains on unless told otherwise: CIFAR-sized, 10 classes
SYNTHETIC = DataInfo(10, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), name="synthetic")


def check_isolation(rule: UpdateRule | str, *, model: str = "resnet32", k: int = 4,
                    reach: int = 1, info: DataInfo | None = None, batch_size: int = 4,
                    seed: int = 0, split: str = "even", atol: float = 0.0) -> None:
    """Raise `AssertionError` unless ``rule`` keeps its local modules gradient-isolated.

    ``rule`` is an `UpdateRule` instance or a rule expression such as ``"mlaan(dgl, k=2)"``;
    it is set up on ``model`` cut into ``k`` modules and trained for one step on a random
    batch (``info``: its shape and classes, CIFAR-sized by default). For every cut m, modules
    m..K-1 are perturbed and modules 0..m-reach must receive the same gradients as before (to
    ``atol``; exactly by default, which CPU kernels give). Every module must also receive some
    gradient: a module no loss reaches would silently never train. The rule's ``train_step``
    must return a `StepResult`. The network and the rule are left as they were built.
    """
    from localearn import expr
    from localearn.build import build_network
    from localearn.engine.step import check_step_result, is_legacy, run_rule

    if reach < 1:
        raise ValueError(f"reach must be at least 1 (got {reach})")
    info = info or SYNTHETIC
    rule = expr.build(rule) if isinstance(rule, str) else rule
    torch.manual_seed(seed)
    net = build_network(model, k, rule, info.num_classes, info.input_shape, split)
    aux = rule.setup(net, info)
    name = f"rule {rule.expression!r} ({type(rule).__module__}.{type(rule).__qualname__})"
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, *info.input_shape, generator=gen)
    targets = torch.randint(0, info.num_classes, (batch_size,), generator=gen)
    saved = (copy.deepcopy(net.state_dict()), copy.deepcopy(aux.state_dict()),
             copy.deepcopy(rule.state_dict()))
    legacy = is_legacy(rule)

    def gradients(perturb_from: int | None) -> list[list[Tensor]]:
        """Each local module's parameter gradients after one step from the saved state, the
        modules from ``perturb_from`` on perturbed first."""
        net.load_state_dict(saved[0])
        aux.load_state_dict(saved[1])
        rule.load_state_dict(copy.deepcopy(saved[2]))
        if perturb_from is not None:
            _perturb(net.local_modules[perturb_from:], seed + perturb_from)
        for p in [*net.parameters(), *aux.parameters()]:
            p.grad = None
        torch.manual_seed(seed)  # dropout and the like draw the same numbers every time
        check_step_result(rule, run_rule(rule, PlainContext(), net, images, targets, legacy),
                          targets)
        return [[torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                 for p in module.parameters()] for module in net.local_modules]

    try:
        base = gradients(None)
        untrained = [i for i, grads in enumerate(base)
                     if not any(bool(torch.count_nonzero(g)) for g in grads)]
        if untrained:
            raise AssertionError(
                f"{name} with K={net.k}: local module(s) {untrained} received no gradient in a "
                "training step; every module must be trained by some loss")
        for cut in range(reach, net.k):
            after = gradients(cut)
            for i in range(cut - reach + 1):
                where = _first_change(net, i, base[i], after[i], atol)
                if where is not None:
                    raise AssertionError(
                        f"{name} with K={net.k} is not gradient-isolated: the gradient of "
                        f"local module {i} ({where}) changed when modules {cut}..{net.k - 1} "
                        f"changed, so a loss of a later module reaches module {i} (allowed "
                        f"reach: {reach} module(s)); detach each module's input, or pass the "
                        "reach the rule intends (MLAAN: reach=k)")
    finally:
        net.load_state_dict(saved[0])
        aux.load_state_dict(saved[1])
        rule.load_state_dict(copy.deepcopy(saved[2]))


def _perturb(modules: nn.ModuleList, seed: int) -> None:
    """Add noise of about half each parameter's typical size to every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modules.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(noise.to(p.device) * (0.5 * p.abs().mean().clamp_min(1e-2)))


def _named(net: SplitNetwork, i: int) -> Iterator[str]:
    return (n for n, _ in net.local_modules[i].named_parameters())


def _first_change(net: SplitNetwork, i: int, before: list[Tensor], after: list[Tensor],
                  atol: float) -> str | None:
    """The first parameter of module ``i`` whose gradient differs, with the largest change."""
    for pname, a, b in zip(_named(net, i), before, after):
        if not torch.allclose(a, b, rtol=0.0, atol=atol):
            return f"parameter {pname!r}, largest change {float((a - b).abs().max()):.3g}"
    return None
