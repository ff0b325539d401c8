import os
from pathlib import Path

import pytest

SHARDS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


@pytest.fixture
def cifar_shards() -> Path:
    """The real CIFAR-10 shards beside the checkout; in CI their absence is a failure."""
    if not (SHARDS / "manifest.json").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CIFAR-10 shards missing at {SHARDS} (CI must provide ../shared)")
        pytest.skip(f"CIFAR-10 shards not found at {SHARDS}")
    return SHARDS
