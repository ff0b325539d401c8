"""MLAAN's leap tables: which later backbone blocks a leap-augmented module copies, by the
policy (`leap_blocks`), by an explicit table (`parse_leaps`) or as the public code's CIFAR
tables (`PUBLIC_LEAPS`, `public_leaps`)."""

from __future__ import annotations

from localearn.errors import UserError
from localearn.interfaces import SplitNetwork


def leap_blocks(unit_shapes: list[tuple[int, ...]], last_unit: int, p: int) -> list[int]:
    """Units a LAM after ``last_unit`` copies: every later shape-changing unit (the first block
    of each later stage, which a chain cannot skip), the final unit, and evenly spaced later
    units up to ``p`` in all. If p is below the number of stage changes ahead, the first p of
    them are kept (the chain must change width in order)."""
    later = list(range(last_unit + 1, len(unit_shapes)))
    if p <= 0 or not later:
        return []
    changes = [u for u in later if unit_shapes[u] != unit_shapes[u - 1]]
    if len(changes) >= p:
        return changes[:p]
    chosen = set(changes) | {later[-1]}
    rest = [u for u in later if u not in chosen]
    spare = min(p - len(chosen), len(rest))
    for j in range(spare):  # evenly spaced among the remaining later units
        chosen.add(rest[round((j + 1) * (len(rest) + 1) / (spare + 1)) - 1])
    return sorted(chosen)


def _rows(*groups: tuple[range | int, list[int]]) -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for modules, units in groups:
        for m in ([modules] if isinstance(modules, int) else modules):
            table[m] = list(units)
    return table


_R32_A, _R32_B, _R32_C = [6, 11, 13, 15], [6, 11, 14, 15], [11, 13, 14, 15]
_R110_A, _R110_B, _R110_C = [19, 37, 39, 54], [37, 39, 40, 54], [37, 40, 41, 54]

#: The public MLAAN code's CIFAR leap tables (``configAuxPlus_new.py``), converted to localearn's
#: indices: module m as split by ``--split public`` (`PUBLIC_SPLITS`; unit 0 is the stem, block
#: ``[stage, b]`` is unit n*(stage-1)+b+1 with n = 5 or 18). The code's ResNet-32 "K=15" and
#: ResNet-110 "K=54" are K=16 and K=55 here (the stem its own module, which has no entry). Every
#: copied block lies after its module. Rows the public code builds but never runs (its module 0)
#: are kept: they serve modules that end a cascade here (``short_cascades=true``, or k=1).
PUBLIC_LEAPS: dict[tuple[str, int], dict[int, list[int]]] = {
    ("resnet32", 8): _rows((range(0, 2), _R32_A), (2, _R32_B), (range(3, 5), _R32_C),
                           (5, [13, 14, 15]), (6, [14, 15])),
    ("resnet32", 16): _rows((range(1, 3), _R32_A), (3, _R32_B), (4, _R32_A), (5, _R32_B),
                            (range(6, 11), _R32_C), (11, [12, 13, 15]), (12, [13, 14, 15]),
                            (13, [14, 15]), (14, [15])),
    ("resnet110", 32): _rows((range(0, 11), _R110_A), (range(11, 21), _R110_B), (21, _R110_C),
                             (range(22, 26), [45, 54]), (range(26, 28), [51, 54]),
                             (28, [52, 54]), (29, [53, 54]), (30, [54])),
    ("resnet110", 55): _rows((range(1, 19), _R110_A), (range(19, 36), _R110_B), (36, _R110_C),
                             (range(37, 44), [45, 54]), (range(44, 48), [51, 54]),
                             (range(48, 50), [52, 54]), (range(50, 53), [53, 54]),
                             (53, [54])),
}


def public_leaps(net: SplitNetwork) -> dict[int, list[int]]:
    """`PUBLIC_LEAPS` for ``net``: CIFAR ResNet-32 at K=8 or 16 and ResNet-110 at K=32 or 55,
    split as the public code splits them. Anything else is a `UserError` naming these. The
    public ImageNet tables are refused on purpose: they name one representative block per
    stage, often the module's own or an earlier one, as a shape template for freshly random
    blocks; a leap-augmented module here copies real later blocks, weights included, and
    tracks the same blocks with its EMA twins, so those tables have no meaning here."""
    supported = ", ".join(f"{m} K={k}" for m, k in PUBLIC_LEAPS)
    key = (net.model_name, net.k)
    if key not in PUBLIC_LEAPS:
        raise UserError(f"leaps=public: the public code has no leap table for model "
                        f"{net.model_name or '(unnamed)'!r} at K={net.k}; it has {supported} "
                        "(CIFAR only: its ImageNet tables are shape templates, see "
                        "docs/mlaan.md)")
    from localearn.models.cifar_resnet import PUBLIC_SPLITS

    if list(net.cuts) != list(PUBLIC_SPLITS[len(net.units)][net.k]):
        raise UserError(f"leaps=public for {net.model_name} K={net.k} is defined on the public "
                        f"code's split; split the network with --split public (it was split "
                        f"{net.split!r})")
    return {m: list(units) for m, units in PUBLIC_LEAPS[key].items()}


def parse_leaps(text: str) -> dict[int, list[int]]:
    """An explicit leap table, ``"2:6,11,13,15; 3:6,11,15"`` (module: unit indices); whether
    its modules and units fit the network is checked by `MLAAN.setup`."""
    table: dict[int, list[int]] = {}
    try:
        for entry in filter(None, (e.strip() for e in text.split(";"))):
            module, units = entry.split(":")
            table[int(module)] = [int(u) for u in units.split(",") if u.strip()]
    except ValueError:
        raise ValueError(f"leaps must read like '2:6,11,15; 3:6,11' or be public (got "
                         f"{text!r})") from None
    return table
