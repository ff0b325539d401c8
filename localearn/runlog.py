"""What a run writes for people to read: metrics files, TensorBoard, the run's settings.

``RUN_DIR/metrics.jsonl`` holds one JSON object per epoch::

    {"epoch": 3, "step": 63, "lr": 0.087, "train_loss": 0.41, "train_acc": 0.88,
     "local_losses": [0.9, 0.7], "test_acc": 0.93, "epoch_time": 12.5,
     "step_time": 0.19, "images_per_s": 330.0, "peak_mem_mb": 812.0}

``RUN_DIR/steps.jsonl`` one every ``log_every`` steps (``step, epoch, lr, loss, local_losses,
train_acc`` of that batch, ``step_time, images_per_s, peak_mem_mb``), ``RUN_DIR/config.json``
the validated settings, and ``RUN_DIR/tb/`` TensorBoard events when asked. ``local_losses[i]``
is module i's auxiliary loss; ``train_loss`` is the last module's (the network's own
classifier). ``peak_mem_mb`` is the peak GPU memory allocated by torch on CUDA and the peak
resident memory of the process on CPU. Only rank 0 writes.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory in bytes: on a CUDA device, torch's peak allocation; else the process's peak
    resident set size. On Linux that is ``VmHWM`` of /proc/self/status: ``ru_maxrss`` would not
    do, because Linux carries it over fork and exec, so a worker started by a large parent
    reports the parent's size. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on others)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory_mb(device: torch.device) -> float:
    """`peak_memory_bytes` in MiB."""
    return peak_memory_bytes(device) / 2**20


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a torn last line (a killed writer) is dropped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class RunLog:
    """Metrics files and optional TensorBoard for one run; a no-op when ``enabled`` is False
    (ranks other than 0)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.steps_path = self.run_dir / "steps.jsonl"
        self.tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def start(self, config: dict[str, Any], history: list[dict], step: int) -> None:
        """Write the settings; rewrite the metrics files to what happened up to ``step`` (a
        resumed run drops rows logged after its checkpoint)."""
        if not self.enabled:
            return
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        kept = []
        if step > 0 and self.steps_path.is_file():
            kept = [r for r in read_jsonl(self.steps_path) if r.get("step", 0) <= step]
        self.steps_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if self.tb is not None and step > 0:
            self.tb.add_text("resume", f"resumed at step {step}", step)

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _scalars(self, prefix: str, row: dict[str, Any], step: int) -> None:
        if self.tb is None:
            return
        for key, value in row.items():
            if key in ("step", "epoch"):
                continue
            if isinstance(value, list):
                for i, v in enumerate(value):
                    self.tb.add_scalar(f"{prefix}/{key}/{i}", v, step)
            elif isinstance(value, (int, float)):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def step(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self._append(self.steps_path, row)
            self._scalars("step", row, row["step"])

    def epoch(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self._append(self.metrics_path, row)
            self._scalars("epoch", row, row["step"])
            if self.tb is not None:
                self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
