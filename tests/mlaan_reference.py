"""A naive MLAAN step, as the paper's equations read: every cascade recomputed from the detached
input of its first module, all losses summed, one backward. Slow on purpose: the oracle that the
single-forward implementation in localearn_plugins.mlaan must match. Cascades end where the rule
says they do (``rule.cascades``: modules k-1..K-2 by default, every module with
``short_cascades=true``)."""

from torch import nn


def naive_step(rule, net, images, targets) -> float:
    K, k = net.k, rule.k
    inputs, x = [], images
    for module in net.local_modules:  # the detached input of every module
        inputs.append(x.detach())
        x = module(x.detach())
    total = 0.0
    for i in range(K - 1):
        out = net.local_modules[i](inputs[i])
        total = total + rule.wx * rule.heads[i].loss(out, targets, images)
        if i not in rule.cascades:
            continue
        z = inputs[max(0, i - k + 1)]
        for j in range(max(0, i - k + 1), i + 1):
            z = net.local_modules[j](z)
        c = rule.cascades.index(i)
        for key, block in zip(rule.twin_keys[c], rule.copies[c]):  # the LAM, as written
            z = block(z) if key is None else block(z) + rule.twins[key](z)
        head = rule.cascade_heads[c]
        total = total + rule.wy * head.loss(z, targets, images)
    z = inputs[max(0, K - k)]
    for j in range(max(0, K - k), K):
        z = net.local_modules[j](z)
    total = total + nn.functional.cross_entropy(z, targets)
    total.backward()
    return total.item()
