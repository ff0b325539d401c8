"""What a measurement runs: the configuration (`RunSpec`) and the run built from it
(`TrainingRun`: `localearn.build.build_run`, as `fit` builds it, stepped by the engine's own
`TrainStep` on a fixed synthetic batch), for memory and speed alike.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from localearn import expr
from localearn.build import build_network, build_run, resolve_device
from localearn.config import FitConfig
from localearn.errors import UserError
from localearn.interfaces import DataInfo, UpdateRule


class RunSpec(BaseModel):
    """One configuration to measure: rule, model, K, batch and input size."""

    model_config = ConfigDict(extra="forbid")

    rule: str = "dgl"
    model: str = "resnet32"
    k: int | None = Field(None, ge=1, description="local modules (None: the rule's default)")
    split: str = "even"
    batch_size: int = Field(128, ge=1)
    input_size: int = Field(32, ge=4, description="height and width of the square input")
    num_classes: int = Field(10, ge=2)
    device: str = "auto"
    seed: int = 0
    precision: Literal["32", "bf16", "16"] = "32"
    channels_last: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"unknown device {v!r}; valid: auto, cpu, cuda, cuda:N")
        return v

    @property
    def info(self) -> DataInfo:
        return DataInfo(self.num_classes, (3, self.input_size, self.input_size),
                        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def label(self) -> str:
        return f"{self.rule} K={self.k}" if self.k is not None else self.rule


def make_spec(**values: object) -> RunSpec:
    """A `RunSpec` from keyword values; an invalid value is one `UserError` line."""
    try:
        return RunSpec.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"invalid {where}: {msg} (got {err.get('input')!r})") from None


def resolve(spec: RunSpec, fallback_k: bool = False) -> RunSpec:
    """Check a spec by building its rule and network; return it with the K actually trained.

    With ``fallback_k``, a K the rule refuses (a baseline such as end-to-end BP that fixes its
    own K) falls back to the rule's default K instead of failing."""
    resolve_device(spec.device)
    rule = expr.build(spec.rule)
    try:
        net = _network(spec, rule)
    except UserError:
        if not fallback_k or spec.k is None:
            raise
        spec = spec.model_copy(update={"k": None})
        net = _network(spec, rule)
    return spec.model_copy(update={"rule": rule.expression, "k": net.k})


def baseline_spec(spec: RunSpec, vs: str, vs_k: int | None = None) -> RunSpec:
    """The baseline ``vs`` on the same model, batch and input: K is ``vs_k`` if given, else
    the rule's K when the baseline accepts it, else the baseline's own default."""
    if vs_k is not None and vs_k < 1:
        raise UserError(f"invalid --vs-k: must be >= 1 (got {vs_k})")
    k = vs_k if vs_k is not None else spec.k
    return resolve(spec.model_copy(update={"rule": vs, "k": k}), fallback_k=vs_k is None)


def _network(spec: RunSpec, rule: UpdateRule) -> nn.Module:
    try:
        return build_network(spec.model, spec.k, rule, spec.num_classes,
                             (3, spec.input_size, spec.input_size), spec.split)
    except RuntimeError as exc:  # the dummy forward that traces shapes failed
        first = str(exc).splitlines()[0]
        raise UserError(f"model {spec.model!r} cannot run on {spec.input_size}x"
                        f"{spec.input_size} inputs ({first}); use a larger --input-size") \
            from None


class TrainingRun:
    """One rule on one model, built by `build_run` and trained by the engine's `TrainStep` on a
    fixed synthetic batch."""

    def __init__(self, spec: RunSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        cfg = FitConfig(rule=spec.rule, model=spec.model, k=spec.k, split=spec.split,
                        batch_size=spec.batch_size, seed=spec.seed, device=str(device),
                        precision=spec.precision, channels_last=spec.channels_last)
        run = build_run(cfg, info=spec.info, device=device)
        self.rule, self.net, self.aux = run.rule, run.net, run.aux
        self.params, self.optimizer, self._step = run.params, run.optimizer, run.step
        self.net.train()
        self.aux.train()
        shape = (spec.batch_size, 3, spec.input_size, spec.input_size)
        self.images = torch.randn(shape, device=device)
        if spec.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.targets = torch.randint(0, spec.num_classes, (spec.batch_size,), device=device)

    def step(self) -> float:
        """One training step; returns the final classifier's loss."""
        totals = self._step(self.images, self.targets)
        return totals[0] / totals[2]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
