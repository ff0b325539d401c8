"""Analyses of trained runs (the MLAAN paper's Section IV-E/F): layer-wise linear probes,
CKA similarity to a reference run, channel feature maps, and transfer to another dataset.

See docs/analysis.md. The command line is in `localearn.analysis.cli`.
"""

from localearn.analysis.cka import StreamingCKA, cka, linear_cka
from localearn.analysis.features import extract_features, feature_maps
from localearn.analysis.probe import linear_probe, probe_run
from localearn.analysis.runs import TrainedRun, load_run
from localearn.analysis.transfer import class_mapping, evaluate_transfer

__all__ = ["StreamingCKA", "TrainedRun", "class_mapping", "cka", "evaluate_transfer",
           "extract_features", "feature_maps", "linear_cka", "linear_probe", "load_run",
           "probe_run"]
