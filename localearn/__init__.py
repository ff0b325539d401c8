"""localearn: supervised local learning for PyTorch."""

from localearn.errors import UserError
from localearn.interfaces import (
    AuxHead,
    DataInfo,
    LocalModuleSplitter,
    LocalRule,
    SplitNetwork,
    StepResult,
    UpdateRule,
)

__version__ = "0.1.0"
__all__ = ["AuxHead", "DataInfo", "LocalModuleSplitter", "LocalRule", "SplitNetwork",
           "StepResult", "UpdateRule", "UserError"]
