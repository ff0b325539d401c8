"""The optimizer of a run and the parameter groups its gradients are clipped in.

`make_optimizer` builds torch's SGD (momentum, Nesterov: the paper's) or AdamW over the run's
de-duplicated trainable parameters. With ``decay_on="weights"`` (AdamW's default) weight decay
skips what timm's recipes exempt (the rule of ``timm.optim.param_groups_weight_decay``): every
parameter of at most one dimension (norm weights, biases) and the parameters a model names in
its ``no_weight_decay()`` (position embeddings, class and register tokens of timm's ViTs). The
rule's auxiliary networks follow the same rule.

`clip_groups` says which parameters share one gradient norm for ``--clip-grad``: per local
module (the module with the auxiliary networks that train with it, `UpdateRule.stage_parts`),
the faithful analogue for gradient-isolated modules of the end-to-end recipes' total norm, which
would let one module's large gradient shrink every other module's step; or, with
``clip_scope="global"``, one group of everything this process trains. An end-to-end rule
(`UpdateRule.end_to_end`: bp) is clipped as one group whatever the scope, as in timm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from localearn.errors import UserError
from localearn.interfaces import SplitNetwork, UpdateRule

__all__ = ["clip_groups", "make_optimizer", "no_decay_ids", "param_groups"]


def no_decay_ids(modules: list[nn.Module]) -> set[int]:
    """The ids of the parameters exempt from weight decay: at most one dimension, or named by
    their model's ``no_weight_decay()`` (timm's models name position embeddings and tokens)."""
    out: set[int] = set()
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            names = getattr(module, "no_weight_decay", None)
            if callable(names):
                listed = set(names())
                out.update(id(p) for n, p in module.named_parameters() if n in listed)
            out.update(id(p) for p in module.parameters(recurse=False) if p.ndim <= 1)
    return out


def param_groups(params: list[nn.Parameter], modules: list[nn.Module], weight_decay: float,
                 decay_on: str) -> list[dict[str, Any]]:
    """One group of ``params`` with ``weight_decay`` (``decay_on="all"``), or two: the decayed
    weights, then the exempt parameters (`no_decay_ids`) at weight decay 0."""
    if decay_on == "all" or weight_decay == 0:
        return [{"params": params, "weight_decay": weight_decay}]
    exempt = no_decay_ids(modules)
    decay = [p for p in params if id(p) not in exempt]
    rest = [p for p in params if id(p) in exempt]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def make_optimizer(cfg: Any, params: list[nn.Parameter],
                   modules: list[nn.Module]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (a `FitConfig`'s: sgd or adamw) over ``params``, which belong to
    ``modules`` (the network, its backbone and the auxiliary networks)."""
    decay_on = cfg.decay_on or ("weights" if cfg.optimizer == "adamw" else "all")
    groups = param_groups(params, modules, cfg.weight_decay, decay_on)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def clip_groups(rule: UpdateRule, net: SplitNetwork, params: list[nn.Parameter],
                modules: range, scope: str = "module") -> list[list[nn.Parameter]]:
    """The parameters of ``params`` that this process trains, in the groups that are clipped
    to one norm each: per module of ``modules`` (its own parameters and those of
    ``rule.stage_parts`` for it; what no module claims forms one group of its own), or one
    group for ``scope="global"`` and for an end-to-end rule."""
    one_norm = scope == "global" or rule.end_to_end
    if one_norm and len(modules) != net.k:
        raise UserError("--clip-grad over all modules (--clip-scope global, or an end-to-end "
                        "rule such as bp) needs the gradient norm of every stage, which "
                        "pipelined stages do not share yet; use --clip-scope module with a local "
                        "rule, or drop --clip-grad or --stages")
    trained = {id(p) for p in params}
    claimed: set[int] = set()
    groups: list[list[nn.Parameter]] = []
    for i in modules:
        parts: list[Any] = [net.local_modules[i], *rule.stage_parts(range(i, i + 1))]
        group = []
        for part in parts:
            for p in ([part] if isinstance(part, nn.Parameter) else part.parameters()):
                if id(p) in trained and id(p) not in claimed:
                    claimed.add(id(p))
                    group.append(p)
        groups.append(group)
    if len(modules) == net.k:  # one process holds every module: the rest is its own
        rest = [p for p in params if id(p) not in claimed]
        if rest:
            groups.append(rest)
    groups = [g for g in groups if g]
    if one_norm:
        return [[p for g in groups for p in g]]
    return groups
