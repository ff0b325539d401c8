"""``localearn fit``: its flags are generated from `FitConfig`'s fields (name, type,
description, default), so the command line and the config file cannot drift apart."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from localearn.cli.common import DEVICE_HELP
from localearn.errors import UserError

_NOT_SETTINGS = ("command", "config", "func", "argv")
#: shorter spellings of some flags
_ALIASES = {"output_dir": ["--out"]}


def _plain(annotation: Any) -> Any:
    """``X`` for ``X | None``; the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def flag_kwargs(name: str, field: FieldInfo) -> dict[str, Any]:
    """``add_argument`` keywords for one config field; every value defaults to None, so only
    the flags given on the command line override the config file."""
    kind = _plain(field.annotation)
    default = field.get_default(call_default_factory=True)
    text = (field.description or name.replace("_", " ")).replace("%", "%%")
    if default is not None and kind is not bool:
        text += f" (default: {default})"
    kw: dict[str, Any] = {"default": None, "help": text}
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction
        kw["help"] = f"{text} (default: {'on' if default else 'off'})"
    elif typing.get_origin(kind) is Literal:
        kw["metavar"] = "{" + ",".join(str(a) for a in typing.get_args(kind)) + "}"
    elif typing.get_origin(kind) is list:
        kw["metavar"] = "A,B,..."
    elif kind in (int, float, Path):
        kw["type"] = kind
        kw["metavar"] = {int: "N", float: "X", Path: "PATH"}[kind]
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("flag"), dict):
        kw.update(extra["flag"])
    return kw


def add_fit_args(p: argparse.ArgumentParser) -> None:
    from localearn.config import FitConfig

    p.add_argument("--config", type=Path, metavar="PATH",
                   help="TOML or YAML file with settings; flags override it")
    for name, field in FitConfig.model_fields.items():
        kw = flag_kwargs(name, field)
        if name == "device":  # every device the config accepts, mps included
            kw["help"] = f"{DEVICE_HELP} (default: auto)"
        p.add_argument("--" + name.replace("_", "-"), *_ALIASES.get(name, []), dest=name, **kw)


def preflight(cfg: Any) -> None:
    """What can be checked before workers start: the rule expression, the device name, the
    output folder (usable, and holding no other run), TensorBoard."""
    from localearn import expr
    from localearn.engine import checkpoint
    from localearn.engine.stages import check_microbatches
    from localearn.runlog import require_tensorboard

    rule = expr.build(cfg.rule)
    check_microbatches(rule, cfg.microbatches, cfg.batch_size, cfg.stages, cfg.drop_last)
    if cfg.stages > 1:
        from localearn.engine.stages import check_pipelinable, parse_stage_cuts

        check_pipelinable(rule, None, cfg.stages, mode=cfg.stage_mode,
                          precision=cfg.precision)
        if cfg.stage_cuts:
            parse_stage_cuts(cfg.stage_cuts, None, cfg.stages)
    if cfg.device not in ("auto", "cpu"):
        from localearn.build import resolve_device

        resolve_device("cuda" if cfg.device.startswith("cuda") else cfg.device)
    if cfg.tensorboard:
        require_tensorboard()
    if cfg.seeds or cfg.resume or cfg.output_dir is None:
        return  # each seed's folder, the checkpoint's or a new one: made and checked by fit
    checkpoint.usable_dir(cfg.output_dir)
    if not cfg.overwrite and checkpoint.held_run(cfg.output_dir) is not None:
        checkpoint.claim_run_dir(cfg.output_dir)  # raises the one-line refusal


def check_precision(cfg: Any) -> None:
    """Refuse float16 autocast on the CPU: PyTorch has no fast float16 kernels there, so a run
    takes about 160 times as long as with bf16."""
    if cfg.precision != "16" or cfg.device not in ("auto", "cpu"):
        return
    import torch

    if cfg.device == "cpu" or not torch.cuda.is_available():
        raise UserError("--precision 16 on the CPU runs about 160x slower than bf16 (no fast "
                        "float16 kernels there); valid on the CPU: --precision bf16 or 32 "
                        "(16 is for GPUs)")


def fit_command(args: argparse.Namespace) -> int:
    import shlex

    from localearn import distributed
    from localearn.api import (
        missing_rules,
        refuse_finished,
        resumed_settings,
        unregistered_rule_message,
    )
    from localearn.config import make_config
    from localearn.engine import fit, fit_repeats
    from localearn.runlog import console_logging

    distributed.die_with_launcher()  # a worker of --nproc: stop when the launcher dies
    given = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}
    overrides = dict(given)
    if args.resume and args.config is None:
        # continue with the settings stored in the checkpoint; flags given now override them
        overrides = resumed_settings(args.resume, given)
    cfg = make_config(args.config, **overrides)
    missing = missing_rules(cfg.rule) if cfg.resume else []
    if missing:  # a run of a rule defined in a notebook: the command line cannot build it
        raise UserError(unregistered_rule_message(cfg.rule, missing))
    if cfg.resume and not distributed.launched():
        refuse_finished(cfg)  # a finished run says so; its summary is not rewritten
    check_precision(cfg)
    if (cfg.nproc > 1 or cfg.stages > 1) and not distributed.launched():
        preflight(cfg)  # a mistake is one line here, not one per worker and a torchrun trace
        return distributed.relaunch(cfg.nproc * cfg.stages, list(args.argv))
    main = distributed.current_env().is_main
    console_logging(force=True)  # the command line owns its console
    command = shlex.join(["localearn", *args.argv])
    if cfg.seeds:
        repeats = fit_repeats(cfg, command=command)
        if main:
            for key, what in (("test_acc", "last"), ("best_test_acc", "best")):
                mean, std = repeats.stats(key)
                each = ", ".join(f"{getattr(r, key):.2%}" for r in repeats.results)
                print(f"{what} test accuracy over seeds {cfg.seeds}: {mean:.2%} +- {std:.2%} "
                      f"(sample std; runs: {each})")
            print(f"wrote {repeats.run_dir / 'seeds.json'}")
        return 0
    result = fit(cfg, command=command)
    if main:
        print(f"final test accuracy {result.test_acc:.2%} (best {result.best_test_acc:.2%} "
              f"at epoch {result.best_epoch})")
    return 0
