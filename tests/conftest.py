import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARDS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the cores: one thread each (and in the processes they
    # start), or torch's spinning threads would oversubscribe them
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def cifar_shards() -> Path:
    """The real CIFAR-10 shards beside the checkout; in CI their absence is a failure."""
    if not (SHARDS / "manifest.json").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CIFAR-10 shards missing at {SHARDS} (CI must provide ../shared)")
        pytest.skip(f"CIFAR-10 shards not found at {SHARDS}")
    return SHARDS


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: kernels sum in one order (exact comparisons), and no thread
    contention on a shared 2-core machine."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """``one_thread`` for a whole test module (``pytestmark = usefixtures(...)``)."""
    with _torch_threads(1):
        yield
