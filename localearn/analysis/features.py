"""Features of a frozen `SplitNetwork`, read at module boundaries or after every unit.

A *position* is a unit index: the output of that unit. Module i's position is its last unit,
so for the last module it is the backbone's features *before* its classifier (pooling and the
linear layer), the input of the classifier rather than the logits. Features are read in eval
mode without gradients, one batch at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from localearn.analysis.runs import DataInfo, SplitNetwork, TrainedRun
from localearn.errors import UserError
from localearn.plot import save_png


# ------------------------------------------------------------------------------ positions
def module_ends(net: SplitNetwork) -> list[int]:
    """The unit index that ends each module (its output is the module boundary)."""
    return [r[-1] for r in net.unit_ranges]


def module_of(net: SplitNetwork, unit: int) -> int:
    """The module that holds ``unit``."""
    for i, r in enumerate(net.unit_ranges):
        if unit in r:
            return i
    raise UserError(f"unit {unit} is out of range: the network has {len(net.units)} units "
                    f"(0..{len(net.units) - 1})")


def positions(net: SplitNetwork, units: bool = False) -> list[int]:
    """Every module boundary, or with ``units`` every unit."""
    return list(range(len(net.units))) if units else module_ends(net)


def pick(items: Sequence[int], count: int, wanted: Sequence[int] | None, what: str) -> list[int]:
    """Resolve user indices (negative counts from the end) into ``range(count)``."""
    if wanted is None:
        return list(items)
    out = []
    for w in wanted:
        i = w + count if w < 0 else w
        if not 0 <= i < count:
            raise UserError(f"{what} {w} is out of range: valid {what}s are 0..{count - 1} "
                            f"(or -{count}..-1)")
        out.append(items[i])
    return out


# ---------------------------------------------------------------------- reading outputs
def unit_outputs(net: SplitNetwork, images: Tensor, units: Sequence[int],
                 hook: Callable[[int, Tensor], Tensor] | None = None) -> list[Tensor]:
    """The outputs of ``units`` (in the order asked) for one batch; stops after the deepest.

    ``hook(unit, output)`` maps each wanted output as soon as it exists (pool it, take its
    Gram matrix), so the full activation need not outlive its unit.
    """
    wanted = set(units)
    last = max(wanted)
    found: dict[int, Tensor] = {}
    x = images
    for i, unit in enumerate(net.units[: last + 1]):
        x = unit(x)
        if i in wanted:
            found[i] = hook(i, x) if hook is not None else x
    return [found[u] for u in units]


def global_pool(x: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, C) by averaging over every spatial position; (B, C) as is."""
    return x.flatten(2).mean(2) if x.ndim > 2 else x


def convert_inputs(images: Tensor, source: DataInfo, target: DataInfo) -> Tensor:
    """Images normalised for ``source`` as the network trained on ``target`` expects them:
    undo the source normalisation, resize (bilinear, antialiased) to the target resolution,
    repeat a grey channel if needed, normalise with the target mean and std."""
    size = tuple(target.input_shape[1:])
    if (tuple(source.mean) == tuple(target.mean) and tuple(source.std) == tuple(target.std)
            and tuple(images.shape[1:]) == tuple(target.input_shape)):
        return images
    x = source.denormalize(images)
    channels = target.input_shape[0]
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise UserError(f"images have {x.shape[1]} channels, the network expects "
                            f"{channels}")
        x = x.expand(-1, channels, -1, -1)
    if tuple(x.shape[-2:]) != size:
        x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                      antialias=True)
    mean = x.new_tensor(target.mean).view(1, -1, 1, 1)
    std = x.new_tensor(target.std).view(1, -1, 1, 1)
    return (x - mean) / std


def batches(loader: DataLoader, limit: int | None = None, *, progress: bool = False,
            desc: str = "") -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` from ``loader``, cut after ``limit`` images, with a progress bar."""
    total = None
    try:
        total = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        pass
    if limit is not None:
        total = limit if total is None else min(total, limit)
    seen = 0
    with tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True,
              disable=not progress, file=sys.stderr) as bar:
        for images, labels in loader:
            if limit is not None and seen + len(labels) > limit:
                images, labels = images[: limit - seen], labels[: limit - seen]
            if len(labels) == 0:
                break
            seen += len(labels)
            bar.update(len(labels))
            yield images, labels
            if limit is not None and seen >= limit:
                break


def make_loader(dataset: Dataset, batch_size: int = 256) -> DataLoader:
    """A plain, ordered loader (no shuffling, no workers): analyses must see fixed inputs."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@dataclass
class Features:
    """Globally average pooled features: ``values[i]`` is (N, C_i) at unit ``units[i]``
    (in module ``modules[i]``; -1 when unknown), ``labels`` the N labels."""

    units: list[int]
    modules: list[int]
    values: list[Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


@torch.no_grad()
def extract_features(net: SplitNetwork, loader: DataLoader, *, units: bool = False,
                     at: Sequence[int] | None = None, device: torch.device | str | None = None,
                     limit: int | None = None, source: DataInfo | None = None,
                     target: DataInfo | None = None, progress: bool = False,
                     desc: str = "features") -> Features:
    """Pooled features of ``net`` at every module boundary (with ``units``: after every unit;
    with ``at``: after those units) over ``loader``, streamed batch by batch and kept on the
    CPU in float32 (only the pooled (N, C) features are kept).

    With ``source`` and ``target``, batches normalised for ``source`` are first converted to
    the network's ``target`` normalisation and resolution (`convert_inputs`).
    """
    wanted = list(at) if at is not None else positions(net, units)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    was_training = net.training
    net.eval()
    chunks: list[list[Tensor]] = [[] for _ in wanted]
    labels: list[Tensor] = []
    try:
        for images, targets in batches(loader, limit, progress=progress, desc=desc):
            x = images.to(device)
            if source is not None and target is not None:
                x = convert_inputs(x, source, target)
            pooled = unit_outputs(net, x, wanted, hook=lambda _, out: global_pool(out))
            for store, p in zip(chunks, pooled):
                store.append(p.float().cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        net.train(was_training)
    if not labels:
        raise UserError("no images to read features from (the split is empty)")
    return Features(units=wanted, modules=[module_of(net, u) for u in wanted],
                    values=[torch.cat(c) for c in chunks], labels=torch.cat(labels))


# -------------------------------------------------------------------------- feature maps
def _concentration(maps: Tensor, top: float = 0.1) -> float:
    """Share of the channel-mean |activation| held by the top ``top`` fraction of positions,
    averaged over images: near ``top`` for evenly spread maps, near 1 for a few hot spots."""
    energy = maps.abs().mean(1).flatten(1)  # (B, H*W)
    n = max(1, round(top * energy.shape[1]))
    share = energy.topk(n, dim=1).values.sum(1) / energy.sum(1).clamp_min(1e-12)
    return float(share.mean())


@torch.no_grad()
def feature_maps(runs: Sequence[TrainedRun], out: Path | str, *, images: int = 4, channels: int = 8,
                 modules: Sequence[int] | None = None, units: Sequence[int] | None = None,
                 ) -> dict[str, Any]:
    """Draw the first ``channels`` channels of chosen outputs for the first ``images`` test
    images of the first run, for every run side by side, into the PNG ``out``.

    Positions are units shared by all runs: ``units`` directly, or ``modules`` of the *first*
    run (its module ends); by default up to four module boundaries of the first run, evenly
    spread. Each panel is one channel, min-max scaled on its own, red = high (``jet``).
    Returns per run and position the output shape and summary statistics over those images.
    """
    if not runs:
        raise UserError("feature maps need at least one run")
    if images < 1 or channels < 1:
        raise UserError("--images and --channels must be at least 1")
    first = runs[0]
    ends = module_ends(first.net)
    if units is not None:
        chosen = pick(range(len(first.net.units)), len(first.net.units), units, "unit")
    elif modules is not None:
        chosen = pick(ends, len(ends), modules, "module")
    else:
        last = len(ends) - 1  # up to four boundaries, the first and the last among them
        chosen = sorted({ends[round(i * last / 3)] for i in range(4)})
    for run in runs[1:]:
        if max(chosen) >= len(run.net.units):
            raise UserError(f"unit {max(chosen)} does not exist in {run.label} "
                            f"({len(run.net.units)} units); pick --units both runs have")

    batch, _ = next(iter(DataLoader(first.data().test, batch_size=images, shuffle=False)))
    batch = batch[:images]
    shown = first.info.denormalize(batch)  # (n, C, H, W) in [0, 1]
    maps: list[list[Tensor]] = []  # per run, per position: (n, c, h, w)
    stats: dict[str, Any] = {"images": len(batch), "channels": channels, "units": chosen,
                             "runs": []}
    for run in runs:
        x = convert_inputs(batch.to(run.device), first.info, run.info)
        outs = unit_outputs(run.net, x, chosen)
        for o in outs:
            if o.ndim != 4:
                raise UserError(f"unit outputs of {run.label} are not (C, H, W) maps "
                                f"(shape {tuple(o.shape[1:])}); feature maps need images")
        maps.append([o[:, :channels].float().cpu() for o in outs])
        stats["runs"].append({
            "run": run.label, "path": str(run.path),
            "positions": [{"unit": u, "module": module_of(run.net, u),
                           "shape": list(o.shape[1:]), "mean": float(o.mean()),
                           "zeros": float((o <= 0).float().mean()),
                           "top10_share": _concentration(o.float())}
                          for u, o in zip(chosen, outs)]})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, r = len(batch), len(runs)
    shown_ch = [m.shape[1] for m in maps[0]]
    cols = 1 + sum(shown_ch)
    rows = n * r
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 1.6, 0.95 * rows + 0.6),
                             dpi=110, squeeze=False)
    for img in range(n):
        for ri, run in enumerate(runs):
            row = img * r + ri
            ax = axes[row][0]
            picture = shown[img].permute(1, 2, 0).numpy()
            ax.imshow(picture if picture.shape[2] == 3 else picture[..., 0], cmap="gray")
            ax.set_ylabel(f"{run.label}\nimage {img}", fontsize=6, rotation=0, ha="right",
                          va="center")
            col = 1
            for pi, m in enumerate(maps[ri]):
                for c in range(shown_ch[pi]):
                    ax = axes[row][col]
                    if c < m.shape[1]:
                        ax.imshow(m[img, c].numpy(), cmap="jet", interpolation="nearest")
                    if row == 0:
                        unit = chosen[pi]
                        title = (f"module {module_of(first.net, unit)} (unit {unit})\nch {c}"
                                 if c == 0 else f"ch {c}")
                        ax.set_title(title, fontsize=6, loc="left")
                    col += 1
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_title("input", fontsize=6)
    fig.suptitle("channel feature maps (each panel min-max scaled; red = high)", fontsize=8)
    fig.tight_layout()
    save_png(fig, out)
    return stats
