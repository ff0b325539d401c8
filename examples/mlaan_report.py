"""MLAAN report: accuracy of bp/dgl/mlaan/mlm/lam, step time against the naive reference and BP,
and parameter counts by role, for ResNet-32 K=16 on the CIFAR-10 shards.

    python examples/mlaan_report.py --data-dir ../shared/data/cifar10 --epochs 2 --train-limit 10000

Every number is measured in this run (same seed, data and schedule for every rule).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from localearn import expr
from localearn.build import build_run
from localearn.config import make_config
from localearn.engine import fit
from localearn.interfaces import DataInfo, PlainContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mlaan_reference import naive_step  # noqa: E402  (the oracle the tests use)

RULES = ["bp", "dgl", "mlaan(dgl)", "mlm(dgl)", "lam(dgl)"]
INFO = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def accuracy_table(args: argparse.Namespace) -> None:
    print(f"\n## Test error, ResNet-32, K=16 (bp: K=1), {args.epochs} epochs, "
          f"{args.train_limit} train / {args.test_limit} test images, seed {args.seed}")
    print("| rule | test error | train loss | time |\n|---|---|---|---|")
    for rule in args.rules:
        cfg = make_config(rule=rule, model="resnet32", k=None if rule == "bp" else 16,
                          dataset="cifar10-shards", data_dir=args.data_dir,
                          train_limit=args.train_limit, test_limit=args.test_limit,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, progress=False, output_dir=args.out / rule)
        start = time.perf_counter()
        result = fit(cfg)
        print(f"| {rule} | {100 * (1 - result.test_acc):.2f}% | {result.train_loss:.3f} | "
              f"{time.perf_counter() - start:.0f}s |", flush=True)


def step_times(args: argparse.Namespace) -> None:
    """Median step time, interleaved (single-forward, naive, bp) after one warm-up step."""
    torch.manual_seed(args.seed)
    images = torch.randn(args.bench_batch, 3, 32, 32)
    targets = torch.randint(0, 10, (args.bench_batch,))
    run = build_run(make_config(rule="mlaan(dgl)", k=16, device="cpu"), info=INFO)
    rule, net, aux = run.rule, run.net, run.aux
    lean = expr.build("mlaan(dgl, recompute=true)")  # same network, its own aux copies
    lean_aux = lean.setup(net, INFO)
    bp_run = build_run(make_config(rule="bp", device="cpu"), info=INFO)
    bp, bp_net = bp_run.rule, bp_run.net
    runs = {
        "mlaan(dgl) single-forward": lambda: rule.train_step(PlainContext(), net, images, targets),
        "mlaan(dgl) naive reference": lambda: naive_step(rule, net, images, targets),
        "mlaan(dgl, recompute=true)": lambda: lean.train_step(PlainContext(), net, images, targets),
        "bp": lambda: bp.train_step(PlainContext(), bp_net, images, targets),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.bench_steps + 1):
        for name, run in runs.items():
            for m in (net, aux, lean_aux, bp_net):
                m.zero_grad(set_to_none=True)
            start = time.perf_counter()
            run()
            if step:  # the first round is warm-up
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["mlaan(dgl) single-forward"]
    print(f"\n## Step time, ResNet-32 K=16, batch {args.bench_batch}, median of "
          f"{args.bench_steps} interleaved steps, {torch.get_num_threads()} threads")
    print("| run | step time | single-forward / this |\n|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {1000 * t:.0f} ms | {base / t:.2f} |")

    print("\n## Parameters, mlaan(dgl) on ResNet-32 K=16")
    count = {"backbone": sum(p.numel() for p in net.parameters())}
    for role, module in rule.aux_groups(aux).items():
        count[role] = sum(p.numel() for p in module.parameters())
    print("| part | parameters |\n|---|---|")
    for role, n in count.items():
        print(f"| {role} | {n / 1e6:.3f}M |")
    print(f"(EMA twins stored once per real block: {len(rule.twins)} twins for "
          f"{len(rule.blocks)} LAMs)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=10_000)
    p.add_argument("--test-limit", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench-batch", type=int, default=128)
    p.add_argument("--bench-steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("runs/mlaan_report"))
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--rules", nargs="+", default=RULES, help="rules of the accuracy table")
    args = p.parse_args()
    if not args.skip_bench:
        step_times(args)
    if not args.skip_training:
        accuracy_table(args)


if __name__ == "__main__":
    main()
