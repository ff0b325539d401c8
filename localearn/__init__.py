"""localearn: supervised local learning for PyTorch.

The plugin contracts are imported here; the Python API (`fit`, `Trainer`, `FitConfig`,
`register_rule`, ...) is imported on first use, so that ``import localearn`` stays light.
"""

from importlib import import_module
from typing import Any

from localearn.errors import UserError
from localearn.interfaces import (
    AuxHead,
    DataInfo,
    HeadFactory,
    LocalModuleSplitter,
    LocalRule,
    PlainContext,
    SplitNetwork,
    StepContext,
    StepResult,
    UpdateRule,
)

__version__ = "0.1.0"

#: the Python API, by the module that defines each name (imported on first use)
_LAZY = {
    **dict.fromkeys(["fit", "load_backbone", "register_dataset", "register_model",
                     "register_rule"], "localearn.api"),
    **dict.fromkeys(["FitConfig", "make_config"], "localearn.config"),
    **dict.fromkeys(["FitResult", "Trainer"], "localearn.engine.loop"),
    "RepeatsResult": "localearn.engine.repeats",
}

__all__ = ["AuxHead", "DataInfo", "HeadFactory", "LocalModuleSplitter", "LocalRule",
           "PlainContext", "SplitNetwork", "StepContext", "StepResult", "UpdateRule", "UserError",
           *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'localearn' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
