"""`build_run`: everything a run trains with, built from a validated `FitConfig`.

`localearn fit`, `localearn memory`, `localearn bench`, `localearn export`, the examples and
the tests all build through here, so what is measured is what is trained: the rule from its
expression, the data (or a given `DataInfo` for synthetic batches), the network through the
registry, the auxiliary networks, device and memory format, the optimizer over the de-duplicated
trainable parameters, the parallel strategy (one process, data parallel, pipelined stages) and
the one `Step` that runs a batch under any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from localearn import distributed as dist_
from localearn import expr, registry
from localearn.config import FitConfig
from localearn.cpu_memory import keep_freed_memory
from localearn.data import DataSplits
from localearn.engine.parallel import DataParallel, Single
from localearn.engine.recipe import WeightEma, make_step_recipe
from localearn.engine.step import Step
from localearn.errors import UserError
from localearn.interfaces import DataInfo, LocalModuleSplitter, UpdateRule
from localearn.network import SplitNetwork
from localearn.optim import clip_groups, make_optimizer


@dataclass
class Run:
    """The parts of one run; the `Trainer` adds data loading, schedule, logs and saving."""

    cfg: FitConfig
    device: torch.device
    env: dist_.DistEnv
    rule: UpdateRule
    net: SplitNetwork
    aux: nn.Module
    info: DataInfo
    data: DataSplits | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    step: Step
    ema: WeightEma | None = None  # the weight average evaluation uses (--ema-decay)

    @property
    def strategy(self) -> Single:
        return self.step.strategy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """The device ``name`` names, refused in one line when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available here; use "
                            "--device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name!r} asked for, but this machine has {count} GPU(s): "
                            f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"device {name!r} asked for, but this PyTorch or machine has no "
                            "MPS (Apple GPU) support; use --device cpu")
    return device


def load_data(cfg: FitConfig) -> DataSplits:
    """The dataset of ``cfg``, its `DataInfo` carrying the registered name. Its shard lists
    may run shell commands (``pipe:`` URLs) only with ``cfg.allow_pipe`` (or
    ``LOCALEARN_ALLOW_PIPE=1``)."""
    from localearn.data.webdata import pipes_allowed, pipes_from_env

    factory = registry.load("dataset", cfg.dataset)
    with pipes_allowed(cfg.allow_pipe or pipes_from_env() is True):
        data = factory(cfg.data_dir, download=cfg.download, train_limit=cfg.train_limit,
                       test_limit=cfg.test_limit, seed=cfg.seed)
    if not data.info.name:
        data.info = dataclasses.replace(data.info, name=cfg.dataset)
    if cfg.val_split is not None:
        from localearn.data.holdout import hold_out

        data = hold_out(data, cfg.val_split)
    return data


def unique_trainable(modules: list[nn.Module]) -> list[nn.Parameter]:
    """Trainable parameters of ``modules`` in order, each once (a rule may share one)."""
    seen: set[int] = set()
    out = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@contextlib.contextmanager
def plugin_failure(what: str) -> Iterator[None]:
    """Turn an exception raised by plugin code into one `UserError` line: ``what`` failed,
    the exception, and the line of plugin code that raised it (the innermost frame outside
    torch). A `UserError` passes through: its line says what is wrong already."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        where = ""
        torch_dir = str(Path(torch.__file__).parent)
        ours = [f for f in traceback.extract_tb(exc.__traceback__)
                if not f.filename.startswith(torch_dir)]
        if ours:
            where = f" (in {ours[-1].name}, {ours[-1].filename}:{ours[-1].lineno})"
        raise UserError(f"{what}: {type(exc).__name__}: {exc}{where}") from None


@contextlib.contextmanager
def token_failure(rule: UpdateRule, model: str, net: SplitNetwork) -> Iterator[None]:
    """A rule whose heads fail on a transformer's (T, D) token boundaries: one `UserError`
    naming the rule and the model (the heads of most rules take (C, H, W) feature maps)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        tokens = [s for s in net.feature_shapes if len(s) != 3]
        if not tokens:
            raise
        raise UserError(f"rule {rule.expression!r} cannot train model {model!r}: its heads "
                        "take (C, H, W) feature maps and this model's module boundaries are "
                        f"(T, D) token sequences {tokens[0]} ({type(exc).__name__}: {exc}); "
                        "train it with a rule whose heads take token sequences") \
            from None


def _check_cpu_fp16() -> None:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError as exc:
        raise UserError(f"--precision 16 is not supported on this CPU ({exc}); use "
                        "--precision bf16") from None


def build_run(cfg: FitConfig, *, info: DataInfo | None = None, device: torch.device | None = None,
              env: dist_.DistEnv | None = None, rule: UpdateRule | None = None) -> Run:
    """Build a run. With ``info`` no data is loaded (synthetic batches of that shape); else the
    dataset of ``cfg``. ``env`` is the process's place in a multi-process job (default: one
    process); every rank starts from rank 0's weights. ``rule``: an already made rule (the
    Python API's) in place of building ``cfg.rule``."""
    env = env or dist_.DistEnv()
    device = device or resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if cfg.precision == "16" and device.type == "cpu":
        _check_cpu_fp16()
    if cfg.sync_bn and env.enabled and device.type != "cuda":
        raise UserError("--sync-bn needs GPUs: torch's SyncBatchNorm has no CPU kernel; "
                        "drop --sync-bn on CPU (BatchNorm statistics stay per rank)")
    seed_everything(cfg.seed)
    if rule is None:
        with plugin_failure(f"rule {cfg.rule!r} failed while being built (its __init__)"):
            rule = expr.build(cfg.rule)
    data = None
    if info is None:
        data = load_data(cfg)
        info = data.info
    who = f"rule {rule.expression!r} ({registry.plugin_name(rule)})"
    with plugin_failure(f"{who} or model {cfg.model!r} failed while the network was cut "
                        "(num_modules, configure)"):
        net = build_network(cfg.model, cfg.k, rule, info.num_classes, info.input_shape,
                            cfg.split)
    with plugin_failure(f"{who} failed while building its auxiliary networks (setup, "
                        "make_head: it gets the feature shape (C, H, W) at a module boundary "
                        "and the DataInfo, and must return an AuxHead)"):
        with token_failure(rule, cfg.model, net):
            aux = rule.setup(net, info)
        if not isinstance(aux, nn.Module):
            raise UserError(f"setup returned {type(aux).__name__}, expected one nn.Module "
                            "holding every auxiliary network (nn.ModuleList() for none)")
    if cfg.sync_bn and env.enabled:
        net = dist_.convert_sync_batchnorm(net)
        aux = dist_.convert_sync_batchnorm(aux)
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    net.to(device, memory_format=memory_format)
    aux.to(device, memory_format=memory_format)
    if env.enabled:  # identical start on every rank, whatever the model's init does
        dist_.broadcast_module(net)
        dist_.broadcast_module(aux)
    seed_everything(cfg.seed + env.rank)  # ranks draw different numbers from here on
    params = unique_trainable([net, aux])
    optimizer = make_optimizer(cfg, params, [net, *filter(None, [net.backbone]), aux])
    strategy = make_strategy(cfg, rule, net, params, optimizer, device, env)
    ema = WeightEma(net, cfg.ema_decay) if cfg.ema_decay is not None else None
    if cfg.stages > 1:  # the stages of one replica draw alike
        seed_everything(cfg.seed + strategy.layout.replica)
    if cfg.compile:  # in place: state-dict names stay those of the plain modules
        for module in rule.compile_targets(net, aux):
            module.compile()
    groups = [] if cfg.clip_grad is None else clip_groups(rule, net, params,
                                                          strategy.modules(net.k),
                                                          cfg.clip_scope)
    recipe = make_step_recipe(cfg, info, groups, ema)
    step = Step(rule, net, optimizer, device, cfg.precision, strategy, recipe)
    return Run(cfg, device, env, rule, net, aux, info, data, params, optimizer, step, ema)


def make_strategy(cfg: FitConfig, rule: UpdateRule, net: SplitNetwork,
                  params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                  device: torch.device, env: dist_.DistEnv) -> Single:
    """Pipelined stages for ``cfg.stages > 1`` (cut by ``cfg.stage_cuts`` or balanced by
    measured time), data parallel in a multi-process job, else one process."""
    from localearn.engine.stages import check_microbatches

    check_microbatches(rule, cfg.microbatches, cfg.batch_size, cfg.stages, cfg.drop_last)
    strategy: Single
    if cfg.stages > 1:
        from localearn.engine.lockstep import LockstepPipeline
        from localearn.engine.pipeline import Pipeline
        from localearn.engine.stages import check_pipelinable, layout_of, plan_cuts

        layout = layout_of(cfg.stages, env)
        check = {"mode": cfg.stage_mode, "precision": cfg.precision}
        check_pipelinable(rule, net.k, cfg.stages, **check)
        starts = plan_cuts(cfg, rule, net, env)
        check_pipelinable(rule, net.k, cfg.stages, starts=starts, **check)
        kind = LockstepPipeline if rule.stage_lockstep else Pipeline
        strategy = kind(env, layout, starts, rule, net, optimizer, device, cfg.stage_mode)
    elif env.enabled:
        strategy = DataParallel(env, params)
    else:
        strategy = Single(env)
    strategy.microbatches = cfg.microbatches
    return strategy


def find_splitter(backbone: nn.Module, model_name: str) -> LocalModuleSplitter:
    """The first registered splitter that accepts ``backbone``."""
    names = registry.available("splitter")
    for name in names:
        splitter = registry.load("splitter", name)()
        if splitter.accepts(backbone):
            return splitter
    raise UserError(f"no registered splitter can cut model {model_name!r}; registered "
                    f"splitters: {', '.join(names)}")


def build_network(model: str, k: int | None, rule: UpdateRule, num_classes: int,
                  input_shape: tuple[int, int, int], split: str = "even") -> SplitNetwork:
    """Backbone from the registry, cut into the K the rule agrees to (validated here); the
    rule then learns the network (`UpdateRule.configure`) before it builds any head."""
    backbone = registry.make_model(model, num_classes, input_shape)
    splitter = find_splitter(backbone, model)
    num_units = len(splitter.units(backbone))
    if k is None:  # a split that fixes K by itself (an explicit cut list) decides it
        k = splitter.implied_k(split, num_units)
    k = rule.num_modules(k, num_units)
    if not 1 <= k <= num_units:
        raise UserError(f"K={k} is out of range for model {model!r}: valid K is 1..{num_units}")
    net = splitter.split(backbone, k, input_shape, policy=split, model_name=model)
    rule.configure(net)
    return net
