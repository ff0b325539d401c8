"""Generalisation to another dataset (the paper's Table VI: trained on CIFAR-10, tested on
STL-10), scored on the classes both datasets share.

Classes are matched by name (case and surrounding spaces ignored) after one documented alias:
STL-10's ``car`` is CIFAR-10's ``automobile``. CIFAR-10 -> STL-10 gives 9 pairs; CIFAR's
``frog`` and STL's ``monkey`` are left out, and test images of a left-out target class are
not scored.

Target test images are converted to what the network trained on: the target normalisation is
undone (its `DataInfo` mean and std), the images are resized bilinearly (antialiased) to the
training resolution and normalised with the *training* set's mean and std.

Prediction: by default the argmax over *all* the network's classes, so an STL image called
"frog" counts as wrong; this is how we read Table VI (the checkpoint's own 10-way classifier,
scored on the 9 shared classes). With ``restrict=True`` the argmax runs over the mapped
classes only. Both accuracies are always computed and reported; ``restrict`` picks the
headline ``accuracy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from localearn.analysis.features import batches, convert_inputs, make_loader
from localearn.analysis.runs import TrainedRun, open_dataset
from localearn.errors import UserError
from localearn.plot import save_png

#: names that mean the same class in different datasets, mapped to one spelling
ALIASES = {"car": "automobile"}


def _canonical(name: str) -> str:
    key = name.strip().lower()
    return ALIASES.get(key, key)


@dataclass
class ClassMapping:
    """Shared classes: ``pairs`` of (source index, target index), with their names."""

    pairs: list[tuple[int, int]]
    source_names: list[str]
    target_names: list[str]
    source_left_out: list[str]
    target_left_out: list[str]

    def target_to_source(self, num_target: int) -> torch.Tensor:
        """A lookup table: target label -> source label, -1 where the class is left out."""
        table = torch.full((num_target,), -1, dtype=torch.long)
        for s, t in self.pairs:
            table[t] = s
        return table


def class_mapping(source_names: Sequence[str], target_names: Sequence[str]) -> ClassMapping:
    """Map the classes of a source dataset (the one trained on) to a target dataset's by
    shared name, with the `ALIASES`; no shared class is a `UserError`."""
    if not source_names or not target_names:
        side = "training" if not source_names else "target"
        raise UserError(f"the {side} dataset has no class names, so its classes cannot be "
                        "matched by name")
    where = {}
    for t, name in enumerate(target_names):
        where.setdefault(_canonical(name), t)
    pairs, used = [], set()
    for s, name in enumerate(source_names):
        t = where.get(_canonical(name))
        if t is not None and t not in used:
            pairs.append((s, t))
            used.add(t)
    if not pairs:
        raise UserError(f"the datasets share no class: trained on {', '.join(source_names)}; "
                        f"target has {', '.join(target_names)}")
    mapped_s = {s for s, _ in pairs}
    return ClassMapping(
        pairs=pairs,
        source_names=[source_names[s] for s, _ in pairs],
        target_names=[target_names[t] for _, t in pairs],
        source_left_out=[n for i, n in enumerate(source_names) if i not in mapped_s],
        target_left_out=[n for i, n in enumerate(target_names) if i not in used])


@dataclass
class TransferResult:
    """Accuracy of ``run`` on ``dataset``'s test split, shared classes only."""

    run: str
    path: str
    dataset: str
    restrict: bool
    accuracy: float  # the headline: restricted if ``restrict`` else over all classes
    accuracy_all_classes: float
    accuracy_restricted: float
    images: int
    pairs: list[tuple[str, str]]
    source_left_out: list[str]
    target_left_out: list[str]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate_transfer(run: TrainedRun, dataset_name: str, data_dir: Path | str | None = None, *,
                      restrict: bool = False, batch_size: int = 256,
                      limit: int | None = None, download: bool = False,
                      progress: bool = False) -> TransferResult:
    """Evaluate ``run`` on the TEST split of the registered dataset ``dataset_name`` (read
    from ``data_dir``), on the classes it shares with the training set (see the module doc).

    ``limit`` reads only the first ``limit`` test images (before the left-out classes are
    dropped)."""
    target = open_dataset(dataset_name, data_dir, test_limit=limit, download=download)
    mapping = class_mapping(run.info.class_names, target.info.class_names)
    lookup = target.info.num_classes
    to_source = mapping.target_to_source(lookup).to(run.device)
    mapped = torch.zeros(run.info.num_classes, dtype=torch.bool, device=run.device)
    mapped[[s for s, _ in mapping.pairs]] = True
    correct_all = torch.zeros(run.info.num_classes, dtype=torch.long)
    correct_res = torch.zeros_like(correct_all)
    seen = torch.zeros_like(correct_all)
    for images, labels in batches(make_loader(target.test, batch_size), limit,
                                  progress=progress, desc=f"evaluate on {dataset_name}"):
        truth = to_source[labels.to(run.device).long()]
        keep = truth >= 0
        if not keep.any():
            continue
        x = convert_inputs(images.to(run.device)[keep], target.info, run.info)
        truth = truth[keep]
        logits = run.net(x).float()
        pred_all = logits.argmax(1)
        pred_res = logits.masked_fill(~mapped, float("-inf")).argmax(1)
        n = run.info.num_classes
        seen += torch.bincount(truth, minlength=n).cpu()
        correct_all += torch.bincount(truth[pred_all == truth], minlength=n).cpu()
        correct_res += torch.bincount(truth[pred_res == truth], minlength=n).cpu()
    total = int(seen.sum())
    if total == 0:
        raise UserError(f"no test image of {dataset_name} belongs to a shared class")
    acc_all = int(correct_all.sum()) / total
    acc_res = int(correct_res.sum()) / total
    per_class = {}
    for (s, _), sname, tname in zip(mapping.pairs, mapping.source_names, mapping.target_names):
        label = sname if sname == tname else f"{sname} = {tname}"
        n_s = int(seen[s])
        per_class[label] = {"images": n_s,
                            "accuracy_all_classes": int(correct_all[s]) / n_s if n_s else 0.0,
                            "accuracy_restricted": int(correct_res[s]) / n_s if n_s else 0.0}
    return TransferResult(
        run=run.label, path=str(run.path), dataset=dataset_name, restrict=restrict,
        accuracy=acc_res if restrict else acc_all, accuracy_all_classes=acc_all,
        accuracy_restricted=acc_res, images=total,
        pairs=list(zip(mapping.source_names, mapping.target_names)),
        source_left_out=mapping.source_left_out, target_left_out=mapping.target_left_out,
        per_class=per_class)


def plot_transfer(result: TransferResult, out: Path | str) -> Path:
    """Per-class accuracy bars (all-class and restricted argmax) with the overall values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.per_class)
    a = [100 * v["accuracy_all_classes"] for v in result.per_class.values()]
    r = [100 * v["accuracy_restricted"] for v in result.per_class.values()]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.8 * len(names) + 2), 4.2), dpi=120)
    ax.bar([x - 0.2 for x in xs], a, width=0.4,
           label=f"argmax over all classes ({100 * result.accuracy_all_classes:.2f}%)")
    ax.bar([x + 0.2 for x in xs], r, width=0.4,
           label=f"argmax over shared classes ({100 * result.accuracy_restricted:.2f}%)")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result.run} on {result.dataset} ({result.images} images)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out)
