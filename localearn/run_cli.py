"""The engine's part of the command line: ``fit`` flags for precision, checkpoints, resume,
logs and processes; ``localearn plot`` and ``localearn export``."""

from __future__ import annotations

import argparse
from pathlib import Path

_NOT_SETTINGS = ("command", "config", "func", "argv")


def add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", metavar="{32,bf16,16}",
                   help="32 (default), bf16 or 16: autocast; 16 adds a gradient scaler")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format for model and inputs")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile every local module and head")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="checkpoint every N steps too (always at each epoch end)")
    p.add_argument("--keep-checkpoints", type=int, metavar="N",
                   help="keep the newest N checkpoints (default 3)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue a run: alone, from the newest checkpoint in --output-dir; "
                   "or from a checkpoint file or run folder")
    p.add_argument("--log-every", type=int, metavar="N",
                   help="write a steps.jsonl row every N steps (default 50)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write TensorBoard events to OUTPUT_DIR/tb")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="synchronise BatchNorm statistics across ranks (GPUs only)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel with N processes on this machine (via torchrun)")


def fit_command(args: argparse.Namespace) -> int:
    from localearn import checkpoint, distributed
    from localearn.config import FitConfig, make_config
    from localearn.engine import fit

    given = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}
    overrides = dict(given)
    if args.resume and args.config is None:
        # continue with the settings stored in the checkpoint; flags given now override them
        out = given.get("output_dir", FitConfig.model_fields["output_dir"].default)
        path, previous = checkpoint.resolve(args.resume, Path(out))
        overrides = {**checkpoint.saved_config(path, previous), **given}
    cfg = make_config(args.config, **overrides)
    if cfg.nproc > 1 and not distributed.launched():
        return distributed.relaunch(cfg.nproc, list(args.argv))
    result = fit(cfg)
    if distributed.current_env().is_main:
        print(f"final test accuracy {result.test_acc:.2%}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from localearn.plot import plot_runs

    out = plot_runs(args.runs, args.output, metric=args.metric, labels=args.label,
                    title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from localearn.checkpoint import export_safetensors

    out = export_safetensors(args.checkpoint, args.output)
    print(f"wrote {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from localearn.plot import METRICS

    p = sub.add_parser("plot", help="draw the accuracy-epoch curves of runs to a PNG")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run folders (each with a metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path, default=Path("accuracy.png"),
                   help="PNG to write (default accuracy.png)")
    p.add_argument("--metric", choices=list(METRICS), default="test_acc")
    p.add_argument("--label", action="append", help="legend label, once per run in order")
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("export", help="write a checkpoint's backbone weights to safetensors")
    p.add_argument("checkpoint", type=Path, help="a checkpoint file or a run folder")
    p.add_argument("-o", "--output", type=Path,
                   help="file to write (default: the checkpoint's name with .safetensors)")
    p.set_defaults(func=cmd_export)
