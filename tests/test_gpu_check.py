"""benchmarks/gpu_check.sh runs end to end on CPU with tiny settings and writes every section."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["# GPU check", "## Device", "## GPU tests", "## Memory at the paper's Table III",
            "#### Memory summary", "## Speed: localearn bench", "### bench: dgl vs bp",
            "### bench: mlaan(dgl) vs bp", "## Transformers",
            "### memory: dgl over a ViT vs bp", "## CIFAR-10 training with --data-on-device",
            "### fit: bp", "### fit: mlaan(dgl)", "#### Training summary", "## Result"]


def test_gpu_check_tiny_on_cpu_writes_every_section(cifar_shards, tmp_path):
    # about 60 s on one thread: seven commands, each a fresh Python process
    report = tmp_path / "report.md"
    env = {**os.environ, "GPU_CHECK_TINY": "1", "DEVICE": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(report),
                           str(cifar_shards)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    text = report.read_text()
    assert proc.returncode == 0, proc.stderr[-2000:] + text[-3000:]
    assert [s for s in SECTIONS if f"\n{s}" not in f"\n{text}"] == []
    assert "Every command succeeded." in text and "exit status 1" not in text
    # each command as typed, and its figures
    preset = ROOT / "examples" / "configs" / "table3" / "cifar10-resnet32-mlaan.toml"
    rule = tomllib.loads(preset.read_text())["memory"]["rule"]
    assert f"$ {sys.executable} -m localearn memory --rule '{rule}'" in text
    assert "--device cpu --json" in text and '"peak_bytes"' in text
    assert "| cifar10-resnet32-mlaan | 2.62 |" in text  # the paper's figure beside ours
    assert text.count("median step time (s)") == 2 and "GFLOPs/image" in text
    assert "--data-on-device" in text and "test accuracy: last" in text
    rows = [line for line in text.splitlines() if line.startswith(("| bp K=1", "| mlaan(dgl)"))]
    assert len(rows) == 2 and all("failed" not in r for r in rows), rows
