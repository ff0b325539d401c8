"""Freed CPU memory is kept for reuse (glibc): a local rule's steps stop faulting their
activations' pages in afresh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# dgl frees each module's activations after its backward pass and refills them next step
STEPS = """
import resource, torch
from localearn import cpu_memory
from localearn.build import build_run
from localearn.config import FitConfig
from localearn.interfaces import DataInfo
run = build_run(FitConfig(rule="dgl", model="resnet32", k=16, batch_size=32),
                device=torch.device("cpu"), info=DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.5,) * 3))
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
run.step(x, y)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    run.step(x, y)
print(cpu_memory._applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(malloc: str) -> tuple[str, int]:
    env = dict(os.environ, LOCALEARN_MALLOC=malloc, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


def _huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: faults then count 2 MiB pages, not 4 KiB."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.is_file() and "[always]" in thp.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux")
@pytest.mark.skipif(_huge_pages_always(), reason="page faults count huge pages here")
def test_a_local_rules_steps_reuse_their_memory():
    applied, kept = _faults("keep")  # build_run applies the settings on the CPU
    untouched, system = _faults("system")
    assert (applied, untouched) == ("True", "False")
    # measured: about 60,000 minor page faults in 3 steps with glibc's defaults, 4,000 kept
    assert system > 20_000, system
    assert kept < system / 5, (kept, system)


def test_a_bad_choice_is_one_line():
    env = dict(os.environ, LOCALEARN_MALLOC="jemalloc", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "localearn", "bench", "--steps", "1",
                           "--vs", "none", "--warmup", "0"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "localearn: error: invalid LOCALEARN_MALLOC='jemalloc': valid: keep (the default: freed "
        "CPU memory is kept for reuse) or system (glibc's own settings)"]
