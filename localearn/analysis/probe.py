"""Layer-wise linear separability (the paper's Fig. 6): a linear probe per position.

The recipe, the same for every position and run:

1. features: the frozen network's output at the position, globally average pooled to (N, C)
   (`localearn.analysis.features`); train features from the train split without augmentation
   where the dataset allows it, test features from the test split;
2. standardise each feature with the *train* mean and std (std floored at 1e-6);
3. a linear layer C -> classes (weights and bias), initialised at zero, trained full batch
   on softmax cross-entropy + ``l2``/2 * ||W||^2 (default ``l2=1e-4``; the bias is not
   penalised) by L-BFGS with a strong-Wolfe line search for at most ``max_iter`` iterations
   (default 200), in float32 on the CPU;
4. report train and test top-1 accuracy.

The problem is convex and the start is zero, so no random draw is involved and the result is
deterministic; ``seed`` fixes only the images chosen by ``train_limit``/``test_limit`` and, for
a train split that cannot be read without augmentation, its crops. For a few thousand images
with <= 128-dim features one probe takes well under a second on one CPU core.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from localearn.analysis.features import Features, extract_features, make_loader, module_of
from localearn.analysis.runs import TrainedRun, plain_train_split, subset
from localearn.errors import UserError
from localearn.plot import save_png


@dataclass
class ProbeScore:
    """One position's probe: unit index, module index (-1 unknown), feature width, accuracy."""

    unit: int
    module: int
    dim: int
    train_acc: float
    test_acc: float


def fit_linear(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
               num_classes: int, *, l2: float = 1e-4,
               max_iter: int = 200) -> tuple[float, float]:
    """Train one probe by the module's recipe; ``(train accuracy, test accuracy)``."""
    train_x, test_x = train_x.float().cpu(), test_x.float().cpu()
    train_y, test_y = train_y.long().cpu(), test_y.long().cpu()
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    linear = nn.Linear(xs.shape[1], num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(linear(xs), train_y)
        loss = loss + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = (linear(xs).argmax(1) == train_y).float().mean().item()
        test_acc = (linear(xt).argmax(1) == test_y).float().mean().item()
    return train_acc, test_acc


def linear_probe(train: Features, test: Features, num_classes: int | None = None, *,
                 l2: float = 1e-4, max_iter: int = 200,
                 progress: bool = False) -> list[ProbeScore]:
    """One linear probe per position of cached pooled features (see the module's recipe)."""
    if train.units != test.units:
        raise UserError("train and test features were read at different positions")
    if len(train) == 0 or len(test) == 0:
        raise UserError("a linear probe needs train and test images")
    classes = num_classes or int(max(train.labels.max(), test.labels.max())) + 1
    scores = []
    for i in tqdm(range(len(train.units)), desc="probes", leave=False, disable=not progress,
                  file=sys.stderr):
        tr, te = fit_linear(train.values[i], train.labels, test.values[i], test.labels,
                            classes, l2=l2, max_iter=max_iter)
        scores.append(ProbeScore(train.units[i], train.modules[i], train.values[i].shape[1],
                                 tr, te))
    return scores


@dataclass
class ProbeReport:
    """Probes of one run: its label and checkpoint, the images used, one score per position."""

    run: str
    path: str
    rule: str
    model: str
    k: int
    train_images: int
    test_images: int
    train_augmented: bool
    scores: list[ProbeScore]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_run(run: TrainedRun, units: Sequence[int] | None = None, *,
              train_limit: int | None = None, test_limit: int | None = None,
              batch_size: int = 256, l2: float = 1e-4, max_iter: int = 200, seed: int = 0,
              progress: bool = False) -> ProbeReport:
    """Linear probes of ``run`` at ``units`` (default: its module boundaries).

    ``train_limit``/``test_limit`` draw a seeded random subset of each split (the probe's
    cost is in reading the features, so limit the train split on a CPU)."""
    splits = run.data()
    train_set, augmented = plain_train_split(splits)
    train_set = subset(train_set, train_limit, seed)
    test_set = subset(splits.test, test_limit, seed)
    kw: dict[str, Any] = {"progress": progress}
    with torch.random.fork_rng(devices=[]):  # an augmented split draws from torch's RNG
        torch.manual_seed(seed)
        train = extract_features(run.net, make_loader(train_set, batch_size), at=units,
                                 limit=train_limit, desc=f"train features {run.folder.name}",
                                 **kw)
    test = extract_features(run.net, make_loader(test_set, batch_size), at=units,
                            limit=test_limit, desc=f"test features {run.folder.name}", **kw)
    scores = linear_probe(train, test, run.info.num_classes, l2=l2, max_iter=max_iter,
                          progress=progress)
    for s in scores:
        s.module = module_of(run.net, s.unit)
    return ProbeReport(run.label, str(run.path), run.rule, run.model, run.k, len(train),
                       len(test), augmented, scores)


def plot_probes(reports: Sequence[ProbeReport], out: Path | str) -> Path:
    """Test accuracy of the probes against depth (unit index), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for rep in reports:
        x = [s.unit for s in rep.scores]
        y = [100 * s.test_acc for s in rep.scores]
        ax.plot(x, y, marker="o", markersize=3, label=rep.run)
    ax.set_xlabel("depth (unit index; the last point is the input of the classifier)")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_title("layer-wise linear separability")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out)
