"""One pydantic model for a training run, validated before anything runs.

Load it from TOML or YAML (`load_config`), override it with command-line flags
(`make_config`); every invalid value becomes a one-line `UserError`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from localearn import registry
from localearn.errors import UserError


class FitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rule: str = Field("dgl", description="rule expression, e.g. dgl or 'mlaan(dgl, k=3)'")
    model: str = Field("resnet32", description="registered model (see: localearn models)")
    k: int | None = Field(None, ge=1, description="number of local modules K, the stem counted "
                                                  "as a unit (default: the rule's)")
    split: str = Field("even", description="how units are grouped into K modules: even; "
                       "balanced (InfoPro*'s memory-balanced split); public (the public "
                       "MLAAN/InfoPro code's cuts); cuts:3,5,8 (unit indices where modules "
                       "1.. start)")
    dataset: str = Field("digits", description="registered dataset (see: localearn datasets)")
    data_dir: Path | None = Field(None, description="where the dataset's files are")
    download: bool = Field(False, description="let torchvision download the dataset")
    train_limit: int | None = Field(None, ge=1, description="train on the first N images only")
    test_limit: int | None = Field(None, ge=1, description="test on the first N images only")
    epochs: int = Field(10, ge=1, description="passes over the training set")
    batch_size: int = Field(128, ge=1, description="images per step (per process)")
    lr: float = Field(0.1, gt=0, description="peak learning rate (SGD)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum (the paper's)")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay")
    warmup_epochs: float | None = Field(
        None, ge=0, description="linear warm-up before the cosine decay (default: 5% of the run)")
    warmup_lr: float = Field(0.01, ge=0, description="learning rate at the start of the warm-up")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    seed: int = Field(0, description="seed of weights, data order and augmentation")
    seeds: list[int] | None = Field(
        None, description="repeat the run once per seed (e.g. 0,1,2), each in OUTPUT_DIR/seed-N, "
        "and report the mean and spread of the last and best test accuracy")
    workers: int = Field(0, ge=0, description="data-loader worker processes")
    output_dir: Path = Field(Path("runs/latest"), description="where metrics and checkpoints go")
    progress: bool = Field(True, description="show a progress bar")
    # engine: precision, speed, checkpoints, logs, distribution (docs/engine.md)
    precision: Literal["32", "bf16", "16"] = Field(
        "32", description="32: float32; bf16/16: autocast (16 adds a gradient scaler)")
    channels_last: bool = Field(False, description="channels-last memory format for model and "
                                                   "inputs")
    compile: bool = Field(False, description="torch.compile the modules each rule names "
                                             "(local modules, heads, MLAAN's copies and twins)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint every N steps (always at each epoch end)")
    keep_checkpoints: int = Field(3, ge=1, description="how many checkpoints to keep")
    resume: str | None = Field(
        None, description="continue a run: alone, from the newest checkpoint in --output-dir; "
        "or from a checkpoint file or run folder",
        json_schema_extra={"flag": {"nargs": "?", "const": "latest", "metavar": "PATH"}})
    log_every: int = Field(50, ge=1, description="write a steps.jsonl row every N steps")
    tensorboard: bool = Field(False, description="also write TensorBoard events to "
                                                 "OUTPUT_DIR/tb")
    sync_bn: bool = Field(False, description="SyncBatchNorm across ranks (GPUs only)")
    nproc: int = Field(1, ge=1, description="train data-parallel with N processes on this "
                                            "machine (via torchrun)")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_alias(cls, v: Any) -> Any:
        aliases = {"32": "32", "fp32": "32", "32-true": "32", "bf16": "bf16",
                   "bf16-mixed": "bf16", "16": "16", "fp16": "16", "16-mixed": "16"}
        key = str(v).lower()
        if key not in aliases:
            raise ValueError(f"unknown precision {v!r}; valid: 32, bf16, 16")
        return aliases[key]

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = [int(x) for x in v.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"seeds must be integers separated by commas (got {v!r})") \
                    from None
        if isinstance(v, list) and not v:
            raise ValueError("seeds must name at least one seed")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"seeds must differ (got {v})")
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        known = registry.available("dataset")
        if v not in known:
            raise ValueError(f"unknown dataset {v!r}; registered datasets: {', '.join(known)}")
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        known = registry.available("model")
        if v not in known:
            raise ValueError(f"unknown model {v!r}; registered models: {', '.join(known)}")
        return v

    @field_validator("data_dir")
    @classmethod
    def _existing_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError(f"data directory {str(v)!r} does not exist")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not v.startswith("cuda:"):
            raise ValueError(f"unknown device {v!r}; valid: auto, cpu, cuda, cuda:N, mps")
        return v

    @model_validator(mode="after")
    def _warmup_inside_run(self) -> FitConfig:
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs "
                             f"({self.epochs})")
        return self


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict (validated later, with any overrides)."""
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise UserError(f"config file {str(path)!r}: unknown format; valid: .toml, .yaml, "
                            ".yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"config file {str(path)!r} is not valid: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a table of settings")
    return data.get("fit", data)


def make_config(file: Path | None = None, **overrides: Any) -> FitConfig:
    """The validated config: the file's values, then every override that is not None."""
    data = load_config(file) if file is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return FitConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if err["loc"] and "input" in err else ""
        raise UserError(f"invalid {where}: {msg}{got}") from None
