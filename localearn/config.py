"""One pydantic model for a training run, validated before anything runs.

Load it from TOML or YAML (`load_config`), override it with command-line flags
(`make_config`); every invalid value becomes a one-line `UserError`.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from localearn import registry
from localearn.errors import UserError

#: the largest float32: a learning rate or weight decay above it overflows in the update
FLOAT32_MAX = 3.4028234663852886e38
#: where AdamW's warm-up starts unless --warmup-lr says (DeiT's recipe)
ADAMW_WARMUP_LR = 1e-6
#: seeds are -2**63..2**63-1 (torch, numpy and the samplers derive their own seeds)
SEED_MAX = 2**63 - 1
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class FitConfig(BaseModel):
    # NaN and infinity are refused for every float setting
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    val_split: float | None = Field(
        None, gt=0, description="hold out N training images (N >= 1) or this share of them "
        "(0 < N < 1) as a validation set, the same for every seed; the best epoch is then "
        "chosen on it, not on the test set")
    epochs: int = Field(10, ge=1, description="passes over the training set")
    batch_size: int = Field(128, ge=1, description="images per step (per process)")
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum (the paper's)")
    weight_decay: float = Field(1e-4, ge=0, description="L2 weight decay")
    # recipes (docs/training.md#recipes)
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd (momentum, --nesterov) or adamw (torch's AdamW; --betas, --eps)")
    betas: list[float] = Field([0.9, 0.999], description="AdamW's betas, e.g. 0.9,0.95")
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    decay_on: Literal["all", "weights"] | None = Field(
        None, description="weight decay on all parameters, or on weights only (not on norms, "
        "biases, position embeddings or tokens); default: all for sgd, weights for adamw")
    clip_grad: float | None = Field(None, gt=0, description="clip gradients to this norm, "
                                    "per local module with its head (see --clip-scope)")
    clip_scope: Literal["module", "global"] = Field(
        "module", description="module: each local module with its auxiliary networks clipped "
        "on its own; global: one norm over all parameters (couples the modules)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of every "
                                   "rule's cross-entropy losses")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (timm's Mixup; 0: off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (timm's Mixup; 0: off)")
    randaugment: int | None = Field(None, ge=0, le=30, description="RandAugment of the "
                                    "training images at this magnitude (two ops, e.g. 9)")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="evaluate an exponential "
                                    "moving average of the weights with this decay, e.g. 0.999")
    warmup_epochs: float | None = Field(
        None, ge=0, description="linear warm-up before the cosine decay (default: 5% of the run)")
    warmup_lr: float = Field(0.01, ge=0,
                             description="learning rate at the start of the warm-up "
                             "(1e-6 with --optimizer adamw)")
    schedule: Literal["warmup_cosine", "public_cifar", "public_imagenet"] = Field(
        "warmup_cosine", description="learning-rate schedule: warmup_cosine (per step); "
        "public_cifar, public_imagenet (the public MLAAN trainers' per-epoch formulas, which "
        "ignore the warm-up settings)")
    drop_last: bool = Field(True, description="drop each epoch's last partial training batch "
                            "(--no-drop-last keeps it, as the public MLAAN trainer does)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    seed: int = Field(0, ge=-SEED_MAX - 1, le=SEED_MAX,
                      description="seed of weights, data order and augmentation")
    seeds: list[int] | None = Field(
        None, description="repeat the run once per seed (e.g. 0,1,2), each in OUTPUT_DIR/seed-N, "
        "and report the mean and spread of the last and best test accuracy")
    workers: int = Field(0, ge=0, description="data-loader worker processes")
    data_on_device: bool = Field(
        False, description="keep the training images (at most 1 GiB) on the device, decoded "
        "once, and crop, flip and normalise them there; no loader workers for training")
    output_dir: Path | None = Field(
        None, description="the run's folder (also --out); default: a new folder "
        "runs/<date>-<time>-<rule>-<model>-k<K> per run")
    overwrite: bool = Field(False, description="let a new run replace the finished (or "
                                               "unfinished) run in --out")
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
        None, description="continue a run: alone, from the newest checkpoint in --out (without "
        "--out: of the newest run under runs/); or from a checkpoint file or run folder",
        json_schema_extra={"flag": {"nargs": "?", "const": "latest", "metavar": "PATH"}})
    log_every: int = Field(50, ge=1, description="write a steps.jsonl row every N steps")
    tensorboard: bool = Field(False, description="also write TensorBoard events to "
                                                 "OUTPUT_DIR/tb")
    sync_bn: bool = Field(False, description="SyncBatchNorm across ranks (GPUs only)")
    nproc: int = Field(1, ge=1, description="train data-parallel with N processes on this "
                                            "machine (via torchrun)")
    stages: int = Field(1, ge=1, description="pipelined training: the K modules in N stages, "
                        "one process each (times --nproc replicas), all training at once")
    stage_cuts: str | None = Field(None, description="the modules where stages 1.. start, "
                                   "e.g. 4,9 (default: balanced by measured time)")
    stage_mode: Literal["sync", "async"] = Field(
        "sync", description="MLAAN-family rules across stages: sync (exactly the one-process "
        "run; stages wait for each other) or async (gradients from the next stage and EMA "
        "twins one step late; no waiting)")
    microbatches: int = Field(1, ge=1, description="cut every batch into N equal microbatches, "
                              "for rules that take them (bp: pipelined over --stages, or "
                              "accumulated in one process)")
    allow_pipe: bool = Field(False, description="let the data's shard lists run shell commands "
                                                "(pipe: URLs); only for data you trust")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """``k = true`` is not K=1: a number setting refuses booleans (pydantic would take them)."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is None or not isinstance(value, bool):
                    continue
                kinds = typing.get_args(field.annotation) if typing.get_origin(
                    field.annotation) in (typing.Union, types.UnionType) else (field.annotation,)
                if int in kinds or float in kinds:
                    raise ValueError(f"{name} must be a number, not a boolean (got {value!r})")
        return data

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
        if isinstance(v, list) and any(isinstance(x, int) and not -SEED_MAX - 1 <= x <= SEED_MAX
                                       for x in v):
            raise ValueError(f"seeds must lie in -2**63..2**63-1 (got {v})")
        return v

    @field_validator("betas", mode="before")
    @classmethod
    def _betas(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = [float(x) for x in v.split(",")]
            except ValueError:
                raise ValueError(f"betas must be two numbers such as 0.9,0.999 (got {v!r})") \
                    from None
        if isinstance(v, (list, tuple)) and (len(v) != 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1
                for x in v)):
            raise ValueError(f"betas must be two numbers in [0, 1) such as 0.9,0.999 (got {v})")
        return v

    @field_validator("val_split")
    @classmethod
    def _val_split(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and v != int(v):
            raise ValueError(f"{v} is neither a count of images (a whole number) nor a share "
                             "of the training set (between 0 and 1)")
        return v

    @field_validator("lr", "weight_decay", "warmup_lr")
    @classmethod
    def _float32(cls, v: float, info: Any) -> float:
        if v > FLOAT32_MAX:
            raise ValueError(f"{info.field_name} must be at most 3.4e38, the largest float32 "
                             "(the update would overflow)")
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
        if not registry.known("model", v):  # family:NAME (timm:NAME) by its family
            raise ValueError(f"unknown model {v!r}; registered models: {', '.join(known)}; "
                             f"families: {registry.families() or 'none'}")
        return v

    @field_validator("data_dir")
    @classmethod
    def _existing_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            if v.exists():
                raise ValueError(f"data directory {str(v)!r} is a file, not a folder; give the "
                                 "folder holding the dataset's files")
            raise ValueError(f"data directory {str(v)!r} does not exist")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError(f"unknown device {v!r}; valid: auto, cpu, cuda, cuda:N (N a GPU "
                             "number), mps")
        return v

    @model_validator(mode="after")
    def _warmup_inside_run(self) -> FitConfig:
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs "
                             f"({self.epochs})")
        return self

    @model_validator(mode="after")
    def _recipe(self) -> FitConfig:
        if self.optimizer == "adamw" and "warmup_lr" not in self.model_fields_set:
            self.warmup_lr = ADAMW_WARMUP_LR  # a warm-up from 0.01 would fall to AdamW's rates
        mixing = self.mixup > 0 or self.cutmix > 0
        if mixing and self.batch_size % 2:
            raise ValueError(f"mixup and cutmix pair each image with another of its batch, so "
                             f"batch_size must be even (got {self.batch_size})")
        if self.stages > 1 and (mixing or self.ema_decay is not None
                                or self.randaugment is not None):
            raise ValueError("mixup, cutmix, randaugment and ema_decay do not run on pipelined "
                             "stages yet; drop them or --stages")
        return self


#: settings that replace results or run commands: a decision of the command line only, never
#: of a (possibly shared) config file
CLI_ONLY = {"allow_pipe": ("--allow-pipe", "a shared file could switch on shell commands that "
                                           "way", "if you trust the data"),
            "overwrite": ("--overwrite", "a shared file could replace finished runs that way",
                          "to replace the run in --out")}
#: the largest config file read (a settings file is a few kilobytes)
MAX_CONFIG_BYTES = 1 << 20


def _no_yaml_aliases(text: str, path: Path) -> None:
    """Refuse YAML anchors and aliases (``&a``, ``*a``): settings need none, and nested aliases
    expand exponentially (a few hundred bytes become gigabytes)."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise UserError(f"config file {str(path)!r} uses a YAML anchor or alias (line "
                            f"{mark.line + 1}); valid: plain settings, each value written out")


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict (validated later, with any overrides)."""
    if path.is_dir():
        raise UserError(f"config file {str(path)!r} is a folder; give a TOML or YAML file")
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UserError(f"config file {str(path)!r} is larger than 1 MiB; valid: a TOML or "
                            "YAML file of settings")
        text = raw.decode("utf-8-sig")  # a byte-order mark (some editors write one) is skipped
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {str(path)!r} is not a text file (byte {exc.start} is not "
                        "UTF-8); valid: TOML or YAML text") from None
    except OSError as exc:
        raise UserError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
    if "\x00" in text:
        raise UserError(f"config file {str(path)!r} holds binary bytes (NUL); valid: TOML or "
                        "YAML text")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            _no_yaml_aliases(text, path)
            data = yaml.safe_load(text) or {}
        else:
            raise UserError(f"config file {str(path)!r}: unknown format; valid: .toml, .yaml, "
                            ".yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"config file {str(path)!r} is not valid: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a table of settings")
    settings = data.get("fit", data)
    if not isinstance(settings, dict):
        raise UserError(f"config file {str(path)!r}: 'fit' must be a table of settings (got "
                        f"{type(settings).__name__} {settings!r:.40})")
    for name, (flag, why, when) in CLI_ONLY.items():
        if name in settings:
            raise UserError(f"config file {str(path)!r} sets {name}: {why}, so it is a "
                            f"command-line flag only; remove it and pass {flag} on the command "
                            f"line {when}")
    return dict(settings)


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
        msg = msg if len(msg) <= 400 else f"{msg[:397]}..."
        got = f" (got {_short(err['input'])})" if err["loc"] and "input" in err else ""
        raise UserError(f"invalid {where}: {msg}{got}") from None


def _short(value: Any, n: int = 100) -> str:
    """``repr(value)``, cut to ``n`` characters: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= n else f"{text[:n - 3]}..."
