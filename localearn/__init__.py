"""localearn: supervised local learning for PyTorch."""

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
__all__ = ["AuxHead", "DataInfo", "HeadFactory", "LocalModuleSplitter", "LocalRule",
           "PlainContext", "SplitNetwork", "StepContext", "StepResult", "UpdateRule", "UserError"]
