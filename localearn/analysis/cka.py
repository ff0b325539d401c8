"""Representation similarity by linear CKA (the paper's Fig. 7).

Linear CKA (Kornblith et al., 2019) of features X (n x p) and Y (n x q), columns centred:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

with K = X X^T, L = Y Y^T. It is 1 for identical representations and invariant to orthogonal
transforms and isotropic scaling of either side. `linear_cka` computes it on all n samples at
once (the biased, "plug-in" HSIC; ``unbiased=True`` for the U-statistic below).

`StreamingCKA` never holds all features: as Nguyen et al. (2021), it averages the *unbiased*
HSIC estimator (Song et al., 2012) over minibatches of n samples each,

    HSIC_1(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))

(K~, L~: the Gram matrices with their diagonal set to zero), and reports
mean HSIC_1(K, L) / sqrt(mean HSIC_1(K, K) * mean HSIC_1(L, L)). Every batch weighs the same;
a batch of fewer than 4 samples is skipped. Unlike the full-batch plug-in estimate, this one
does not depend on the batch size in expectation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from localearn.analysis.features import (
    batches,
    convert_inputs,
    global_pool,
    make_loader,
    module_ends,
    module_of,
    unit_outputs,
)
from localearn.analysis.runs import DataInfo, TrainedRun
from localearn.errors import UserError
from localearn.plot import save_png


def _flat(x: Tensor) -> Tensor:
    return x.reshape(len(x), -1).double()


def gram(x: Tensor) -> Tensor:
    """The linear-kernel Gram matrix (float64) of the flattened, column-centred features ``x``
    (centring changes no HSIC estimate here; it keeps the products well conditioned)."""
    x = x.reshape(len(x), -1)
    x = x.double() if x.dtype == torch.float64 else x.float()
    x = x - x.mean(0, keepdim=True)
    return (x @ x.T).double()


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> float:
    """Linear CKA of two feature sets with the same n samples (rows), on all of them at once.

    Default: the plug-in estimate of Kornblith et al.; ``unbiased``: the ratio of unbiased
    HSIC estimates (needs n >= 4), which a `StreamingCKA` fed one batch reproduces."""
    if len(x) != len(y):
        raise UserError(f"CKA needs the same samples on both sides: {len(x)} vs {len(y)}")
    if unbiased:
        acc = StreamingCKA()
        if not acc.update(x, y):
            raise UserError("the unbiased CKA estimate needs at least 4 samples")
        return float(acc.value()[0, 0])
    xc, yc = _flat(x), _flat(y)
    xc, yc = xc - xc.mean(0), yc - yc.mean(0)
    if max(xc.shape[1], yc.shape[1]) <= len(xc):  # feature space: p x q products
        xy = (yc.T @ xc).pow(2).sum()
        xx = (xc.T @ xc).pow(2).sum().sqrt()
        yy = (yc.T @ yc).pow(2).sum().sqrt()
    else:  # sample space: n x n Gram matrices
        k, lm = xc @ xc.T, yc @ yc.T
        xy, xx, yy = (k * lm).sum(), k.pow(2).sum().sqrt(), lm.pow(2).sum().sqrt()
    return float(xy / (xx * yy))


def _hsic1(k: Tensor, lm: Tensor) -> Tensor:
    """Unbiased HSIC of every pair: ``k`` (a, n, n), ``lm`` (b, n, n) Gram matrices -> (a, b)."""
    n = k.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k, lm = k.masked_fill(eye, 0.0), lm.masked_fill(eye, 0.0)
    trace = torch.einsum("iuv,juv->ij", k, lm)  # tr(K~ L~), both symmetric
    rk, rl = k.sum(2), lm.sum(2)  # K~ 1, L~ 1
    sk, sl = rk.sum(1), rl.sum(1)  # 1^T K~ 1, 1^T L~ 1
    cross = rk @ rl.T  # 1^T K~ L~ 1
    total = trace + sk[:, None] * sl[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross
    return total / (n * (n - 3))


def _hsic1_self(k: Tensor) -> Tensor:
    """Unbiased HSIC of each Gram matrix with itself: (a, n, n) -> (a,)."""
    n = k.shape[-1]
    k = k.masked_fill(torch.eye(n, dtype=torch.bool, device=k.device), 0.0)
    r = k.sum(2)
    s = r.sum(1)
    total = k.pow(2).sum((1, 2)) + s * s / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * r.pow(2).sum(1)
    return total / (n * (n - 3))


class StreamingCKA:
    """Minibatch linear CKA between ``num_x`` and ``num_y`` representations at once.

    ``update(xs, ys)`` takes one batch: a tensor or a list of ``num_x`` tensors (n, ...) for
    the X side, likewise for Y, the same n samples throughout; only three running sums of
    HSIC estimates are kept. `value` is the (num_x, num_y) matrix of CKA values.
    """

    def __init__(self, num_x: int = 1, num_y: int = 1) -> None:
        self.num_x, self.num_y = num_x, num_y
        self.xy = torch.zeros(num_x, num_y, dtype=torch.float64)
        self.xx = torch.zeros(num_x, dtype=torch.float64)
        self.yy = torch.zeros(num_y, dtype=torch.float64)
        self.batches = 0
        self.samples = 0

    def update(self, xs: Tensor | Sequence[Tensor], ys: Tensor | Sequence[Tensor]) -> bool:
        """Add one batch of features; False (and nothing added) if it has fewer than 4."""
        xs = [xs] if isinstance(xs, Tensor) else list(xs)
        ys = [ys] if isinstance(ys, Tensor) else list(ys)
        return self.update_grams(torch.stack([gram(x) for x in xs]),
                                 torch.stack([gram(y) for y in ys]))

    def update_grams(self, kx: Tensor, ky: Tensor) -> bool:
        """Add one batch given as Gram matrices, ``kx`` (num_x, n, n) and ``ky`` (num_y, n, n)."""
        if kx.shape[0] != self.num_x or ky.shape[0] != self.num_y:
            raise ValueError(f"expected {self.num_x} and {self.num_y} representations, got "
                             f"{kx.shape[0]} and {ky.shape[0]}")
        n = kx.shape[-1]
        if ky.shape[-1] != n:
            raise ValueError(f"both sides need the same samples: {n} vs {ky.shape[-1]}")
        if n < 4:
            return False
        kx, ky = kx.double(), ky.double()
        self.xy += _hsic1(kx, ky).cpu()
        self.xx += _hsic1_self(kx).cpu()
        self.yy += _hsic1_self(ky).cpu()
        self.batches += 1
        self.samples += n
        return True

    def value(self) -> Tensor:
        """CKA of every pair, float64 (num_x, num_y); NaN before any batch."""
        if self.batches == 0:
            return torch.full((self.num_x, self.num_y), math.nan, dtype=torch.float64)
        denom = (self.xx.clamp_min(0)[:, None] * self.yy.clamp_min(0)[None, :]).sqrt()
        return self.xy / denom  # the 1/batches of each mean cancels


@dataclass
class CKAResult:
    """CKA of ``run`` against ``against``: ``matrix[i][j]`` compares unit i of ``run`` with
    unit j of ``against``; ``boundaries`` are the module ends of either run (units),
    ``modules`` the module of each in ``run`` and in ``against``, ``at_boundaries`` the
    matching diagonal values and ``mean`` their mean (the paper's summary)."""

    run: str
    against: str
    path: str
    against_path: str
    model: str
    images: int
    batches: int
    pooled: bool
    boundaries: list[int]
    modules: list[tuple[int, int]]
    at_boundaries: list[float]
    mean: float
    diagonal: list[float]
    matrix: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def cka(run_a: TrainedRun, run_b: TrainedRun, loader: DataLoader | None = None, *,
        pool: bool = False, limit: int | None = None, batch_size: int = 256,
        source: DataInfo | None = None, progress: bool = False) -> CKAResult:
    """Linear CKA (minibatch, `StreamingCKA`) between every unit of ``run_a`` and every unit
    of ``run_b`` (the reference, e.g. BP) on the same images.

    Images come from ``loader`` (normalised as ``source`` says; default: ``run_a``'s test
    split and its `DataInfo`), converted to each run's own normalisation. Features are the
    flattened unit outputs (C*H*W), or with ``pool`` the globally pooled ones (C). Both runs
    must be of one model, so that unit i is at the same depth in both. The summary is read
    at the module boundaries of either run (a K=4 run against BP: its 4 boundaries).
    """
    if run_a.model != run_b.model:
        raise UserError(f"cka compares runs of one model: {run_a.label} is {run_a.model}, "
                        f"{run_b.label} is {run_b.model}")
    if loader is None:
        loader = make_loader(run_a.data().test, batch_size)
        source = run_a.info
    source = source or run_a.info
    na, nb = len(run_a.net.units), len(run_b.net.units)
    acc = StreamingCKA(na, nb)

    def gram_of(_: int, out: Tensor) -> Tensor:
        return gram(global_pool(out) if pool else out)

    for images, _ in batches(loader, limit, progress=progress,
                             desc=f"cka {run_a.folder.name} vs {run_b.folder.name}"):
        grams = []
        for run in (run_a, run_b):
            x = convert_inputs(images.to(run.device), source, run.info)
            units = range(len(run.net.units))
            grams.append(torch.stack(unit_outputs(run.net, x, units, hook=gram_of)).cpu())
        acc.update_grams(*grams)
    if acc.batches == 0:
        raise UserError("cka needs at least 4 images")
    matrix = acc.value()
    ends = sorted(set(module_ends(run_a.net)) | set(module_ends(run_b.net)))
    at = [float(matrix[u, u]) for u in ends]
    modules = [(module_of(run_a.net, u), module_of(run_b.net, u)) for u in ends]
    return CKAResult(run=run_a.label, against=run_b.label, path=str(run_a.path),
                     against_path=str(run_b.path), model=run_a.model, images=acc.samples,
                     batches=acc.batches, pooled=pool, boundaries=ends, modules=modules,
                     at_boundaries=at,
                     mean=sum(at) / len(at),
                     diagonal=[float(matrix[i, i]) for i in range(min(na, nb))],
                     matrix=matrix.tolist())


def plot_cka(results: Sequence[CKAResult], out: Path | str) -> Path:
    """One PNG: CKA at each run's module boundaries against depth (left), then one heatmap
    per comparison (unit of the run on y, unit of the reference on x; brighter = more alike)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = len(results)
    fig, axes = plt.subplots(1, p + 1, figsize=(4.6 * (p + 1), 4.0), dpi=120, squeeze=False)
    line = axes[0][0]
    for r in results:
        line.plot(r.boundaries, r.at_boundaries, marker="o", markersize=3,
                  label=f"{r.run} vs {r.against} (mean {r.mean:.3f})")
    line.set_xlabel("depth (unit index at each module boundary)")
    line.set_ylabel("linear CKA")
    line.set_ylim(0, 1.02)
    line.set_title("similarity at module boundaries")
    line.grid(alpha=0.3)
    line.legend(fontsize=6)
    for ax, r in zip(axes[0][1:], results):
        img = ax.imshow(torch.tensor(r.matrix).numpy(), origin="lower", vmin=0, vmax=1,
                        cmap="magma", interpolation="nearest")
        ax.plot(r.boundaries, r.boundaries, "o", color="cyan", markersize=3,
                label="module boundaries")
        ax.set_xlabel(f"unit of {r.against}", fontsize=7)
        ax.set_ylabel(f"unit of {r.run}", fontsize=7)
        ax.set_title("linear CKA, unit by unit", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
        fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_png(fig, out)
