"""Load a finished run for analysis: its config, its trained `SplitNetwork`, its `DataInfo`.

Every import from the engine and the checkpoint module lives in this file, so the analyses
depend on the training code in one place only. The network is rebuilt exactly as training
builds it (rule from its expression, network through the registry), then the checkpoint's
``model`` state is loaded into it. A run of a rule this session does not know (one defined in
a notebook) is rebuilt without it, at the K it was trained with: the backbone is all the
analyses read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from localearn import expr, registry
from localearn.api import missing_rules, unregistered_rule_message
from localearn.build import build_network, resolve_device
from localearn.data import DataSplits
from localearn.engine import checkpoint as ckpt_io
from localearn.engine.checkpoint import SavedRun
from localearn.errors import UserError
from localearn.interfaces import DataInfo
from localearn.network import SplitNetwork

__all__ = ["DataInfo", "DataSplits", "SplitNetwork", "TrainedRun", "load_run", "open_dataset",
           "plain_train_split", "resolve_device", "subset"]


def open_dataset(name: str, data_dir: Path | str | None = None, *,
                 train_limit: int | None = None, test_limit: int | None = None,
                 seed: int = 0, download: bool = False) -> DataSplits:
    """The registered dataset ``name``, built as training builds it (its factory)."""
    factory = registry.load("dataset", name)
    return factory(Path(data_dir) if data_dir else None, download=download,
                   train_limit=train_limit, test_limit=test_limit, seed=seed)


@dataclass
class TrainedRun:
    """A trained run, ready to analyse: ``net`` is in eval mode on ``device``."""

    path: Path  # the checkpoint file
    config: dict[str, Any]
    net: SplitNetwork
    info: DataInfo
    dataset: str
    rule: str
    device: torch.device
    data_dir: Path | None = None
    _splits: DataSplits | None = field(default=None, repr=False)
    #: why the rule could not be built (None: it was), for analyses that need it
    rule_missing: str | None = None

    @property
    def model(self) -> str:
        return str(self.config["model"])

    @property
    def k(self) -> int:
        return self.net.k

    @property
    def folder(self) -> Path:
        """The run folder (``RUN`` for ``RUN/checkpoint.pt`` and ``RUN/checkpoints/*.pt``)."""
        parent = self.path.parent
        return parent.parent if parent.name == "checkpoints" else parent

    @property
    def label(self) -> str:
        """``folder: rule K=k``, short enough for a legend or a table header."""
        return f"{self.folder.name}: {self.rule} K={self.k}"

    def data(self) -> DataSplits:
        """The run's dataset (loaded once): train split as limited in training, whole test."""
        if self._splits is None:
            cfg = self.config
            self._splits = open_dataset(self.dataset, self.data_dir,
                                        train_limit=cfg.get("train_limit"),
                                        seed=int(cfg.get("seed", 0)))
        return self._splits


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        final = path / "checkpoint.pt"
        if final.is_file():
            return final
        steps = ckpt_io.list_checkpoints(path)
        hint = (f"; it holds step checkpoints of an unfinished run, pass one of them, e.g. "
                f"{steps[-1]}" if steps else "")
        raise UserError(f"{path} is not a finished run: {final} does not exist{hint}")
    if not path.exists():
        raise UserError(f"run {path} does not exist (pass a run folder holding checkpoint.pt, "
                        "or a checkpoint file)")
    return path


def _info_from_state(state: dict[str, Any]) -> DataInfo | None:
    """The `DataInfo` stored in the checkpoint (``data_info`` with mean, std and class names;
    classes and input shape beside it), if the engine wrote one."""
    raw = state.get("data_info")
    if not isinstance(raw, dict) or "mean" not in raw or "std" not in raw:
        return None
    num_classes = raw.get("num_classes", state.get("num_classes"))
    input_shape = raw.get("input_shape", state.get("input_shape"))
    if num_classes is None or input_shape is None:
        return None
    return DataInfo(int(num_classes), tuple(input_shape), tuple(raw["mean"]),
                    tuple(raw["std"]), tuple(raw.get("class_names", ())))


class _BackboneOnly:
    """Stands in for a rule this session does not know: the network is cut into the K the run
    was trained with and nothing else is learned about it."""

    def __init__(self, k: int | None) -> None:
        self.k = k

    def num_modules(self, requested: int | None, num_units: int) -> int:
        return self.k if self.k is not None else (requested or num_units)

    def configure(self, net: SplitNetwork) -> None:
        pass


def load_run(path: Path | str, device: str | torch.device = "cpu", *,
             data_dir: Path | str | None = None) -> TrainedRun:
    """Load a run folder (``RUN/checkpoint.pt``) or a checkpoint file for analysis.

    ``data_dir`` overrides where the training dataset is read from (default: the folder the run
    was trained with). The dataset is opened to learn its `DataInfo` (normalisation, class
    names) unless the checkpoint carries it. Anything wrong is a one-line `UserError`.
    """
    path = _checkpoint_file(Path(path))
    state = SavedRun.open(path).state  # the one reader of saved runs: every field checked
    cfg = dict(state["config"])
    for key in ("rule", "model", "dataset"):
        if key not in cfg:
            raise UserError(f"checkpoint {path} has no {key!r} in its config; it cannot be "
                            "analysed")
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    folder = data_dir if data_dir is not None else cfg.get("data_dir")
    run_data_dir = Path(folder) if folder else None

    splits: DataSplits | None = None
    info = _info_from_state(state)
    if info is None:
        splits = open_dataset(cfg["dataset"], run_data_dir, train_limit=cfg.get("train_limit"),
                              seed=int(cfg.get("seed", 0)))
        info = splits.info
    num_classes = int(state.get("num_classes", info.num_classes))
    input_shape = tuple(state.get("input_shape", info.input_shape))

    missing = missing_rules(str(cfg["rule"]))
    rule: Any = _BackboneOnly(state.get("model_k", cfg.get("k"))) if missing else \
        expr.build(cfg["rule"])
    net = build_network(cfg["model"], cfg.get("k"), rule, num_classes, input_shape,
                        cfg.get("split", "even"))
    weights = ckpt_io.evaluated_weights(state)  # the weight average, when the run kept one
    ckpt_io.check_state(net, weights, "model", path)
    net.load_state_dict(weights)
    net.to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return TrainedRun(path=path, config=cfg, net=net, info=info, dataset=cfg["dataset"],
                      rule=getattr(rule, "expression", cfg["rule"]), device=dev,
                      data_dir=run_data_dir, _splits=splits,
                      rule_missing=unregistered_rule_message(str(cfg["rule"]), missing)
                      if missing else None)


def plain_train_split(splits: DataSplits) -> tuple[Dataset, bool]:
    """The train split with the test split's transform (no augmentation) where the dataset
    allows swapping it; else the train split as is. Returns ``(dataset, augmented)``."""

    def swap(train: Any, test: Any) -> Any:
        if isinstance(train, Subset):
            inner = swap(train.dataset, test.dataset if isinstance(test, Subset) else test)
            return None if inner is None else Subset(inner, train.indices)
        if isinstance(test, Subset):
            test = test.dataset
        if hasattr(train, "transform") and hasattr(test, "transform"):
            plain = copy.copy(train)
            plain.transform = test.transform
            return plain
        return None

    plain = swap(splits.train, splits.test)
    return (splits.train, True) if plain is None else (plain, False)


def subset(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """At most ``limit`` samples: a seeded random choice for map-style datasets (kept in index
    order), the first ``limit`` for streams (cut by the caller)."""
    if limit is None or isinstance(dataset, IterableDataset):
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    if limit >= n:
        return dataset
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return Subset(dataset, idx.tolist())
