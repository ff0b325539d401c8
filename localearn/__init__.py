"""localearn: supervised local learning for PyTorch.

The plugin contracts (`UpdateRule`, `LocalRule`, `AuxHead`, ...) and the Python API (`fit`,
`Trainer`, `FitConfig`, `register_rule`, ...) are imported on first use, so that
``import localearn`` (and ``localearn --help``) does not import torch.
"""

from importlib import import_module
from typing import Any

from localearn.errors import UserError

__version__ = "0.1.0"

#: the Python API, by the module that defines each name (imported on first use)
_LAZY = {
    **dict.fromkeys(["AuxHead", "DataInfo", "HeadFactory", "LocalModuleSplitter", "LocalRule",
                     "PlainContext", "SplitNetwork", "StepContext", "StepResult", "UpdateRule"],
                    "localearn.interfaces"),
    **dict.fromkeys(["fit", "load_backbone", "register_dataset", "register_model",
                     "register_rule"], "localearn.api"),
    **dict.fromkeys(["FitConfig", "make_config"], "localearn.config"),
    **dict.fromkeys(["FitResult", "Trainer"], "localearn.engine.loop"),
    "RepeatsResult": "localearn.engine.repeats",
}

__all__ = ["UserError", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'localearn' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
