"""The Python API: a rule written in the caller's own code (no package, no
entry point) trained in-process through `localearn.fit`, alone and under MLAAN; session
registration; console output through the ``localearn`` logger."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from localearn_plugins.mlaan import MLAAN
from torch import nn

import localearn
from localearn import registry
from localearn.engine.checkpoint import read
from localearn.models.cifar_resnet import CifarResNet
from localearn.runlog import LOGGER, ConsoleHandler, console_logging


# -- what a notebook user writes: a head and a rule, defined here and nowhere else
class LinearProbeHead(localearn.AuxHead):
    def __init__(self, shape, info):
        super().__init__(shape, info)
        self.fc = nn.Linear(shape[0], info.num_classes)

    def loss(self, features, targets, images):
        return nn.functional.cross_entropy(self.fc(features.mean((2, 3))), targets)


class NotebookProbe(localearn.LocalRule):
    def make_head(self, index, num_modules, shape, info):
        return LinearProbeHead(shape, info)


def tiny_resnet(num_classes: int = 10, **_) -> nn.Module:
    """CIFAR ResNet-8 at half width: stem + 3 blocks (4 units), ~20k parameters."""
    return CifarResNet(1, num_classes, widths=(8, 16, 32))


@pytest.fixture
def session(monkeypatch):
    """A clean session registry, with the tiny backbone registered as a notebook would."""
    monkeypatch.setattr(registry, "_SESSION", {kind: {} for kind in registry.GROUPS})
    localearn.register_model("tiny", tiny_resnet)


@pytest.fixture
def captured(monkeypatch):
    """The localearn logger's records, and nothing on the console (a caller's redirection)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    monkeypatch.setattr(LOGGER, "handlers", [Keep()])
    monkeypatch.setattr(LOGGER, "propagate", False)
    # setLevel, not a plain attribute: it also clears the logger's isEnabledFor cache, which an
    # earlier test's INFO call at a higher level may have filled with False
    old = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    yield records
    LOGGER.setLevel(old)


# 640 digits, batches of 32, 3 epochs: measured 49.5% (probe, K=2) and 63.5% (mlaan, K=4) on
# a 2-core CPU; chance is 10%
BUDGET = dict(model="tiny", epochs=3, train_limit=640, test_limit=200, batch_size=32, lr=0.1,
              device="cpu", seed=0)


def _learned(result) -> None:
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3 and losses[-1] < 0.9 * losses[0], losses
    assert result.test_acc > 0.30, result.history


def test_notebook_rule_class_trains_in_process(session, captured, tmp_path, capsys):
    result = localearn.fit(rule=NotebookProbe, k=2, output_dir=tmp_path / "run", **BUDGET)
    _learned(result)
    # the trained parts come back: the caller's rule, its heads, the network
    assert isinstance(result.rule, NotebookProbe) and result.rule.expression == "notebookprobe"
    heads = [m for m in result.aux.modules() if isinstance(m, LinearProbeHead)]
    assert len(heads) == 1 and result.net.k == 2  # one head: modules 0..K-2
    assert result.run_dir == tmp_path / "run" and result.summary["rule"] == "notebookprobe"
    # the returned network is the one saved: its weights equal the final checkpoint's
    saved = read(result.checkpoint)["model"]
    own = result.net.state_dict()
    assert own.keys() == saved.keys()
    assert all(torch.equal(own[k].cpu(), saved[k]) for k in own)
    # console output went through the logger (redirected here), never straight to the console;
    # no progress bar either: stdout is not a terminal
    text = [r.getMessage() for r in captured]
    assert any(t.startswith("training notebookprobe on tiny (K=2)") for t in text), text
    assert sum(t.startswith("epoch ") for t in text) == 3
    assert any(t.startswith("summary: ") for t in text)
    out, err = capsys.readouterr()
    assert out == "" and err == "", (out, err)


def test_composed_rule_object_trains_under_mlaan(session, captured, tmp_path):
    rule = MLAAN(NotebookProbe(), k=2)
    result = localearn.fit(rule=rule, k=4, output_dir=tmp_path / "run", **BUDGET)
    _learned(result)
    # recorded with its options; the unregistered base said so, in one line and the summary
    assert result.rule is rule and rule.expression == "mlaan(notebookprobe, k=2)"
    assert result.summary["rule"] == "mlaan(notebookprobe, k=2)"
    notes = [r.getMessage() for r in captured if r.levelno == logging.WARNING]
    assert len(notes) == 1 and "NotebookProbe is not registered" in notes[0], notes
    saved = json.loads((result.run_dir / "summary.json").read_text())
    assert saved["rule_exact"] is False and "register_rule" in saved["rule_note"]
    # MLAAN made its heads with the caller's factory, and its copies and twins
    assert any(isinstance(m, LinearProbeHead) for m in result.aux["heads"].modules())
    roles = result.summary["parameters"]
    assert {"backbone", "heads", "copies", "twins", "total"} <= roles.keys()
    assert roles["copies"] > 0 and roles["twins"] > 0


def test_registered_rule_is_usable_in_expressions(session):
    localearn.register_rule("nbprobe", NotebookProbe)
    assert registry.providers("rule")["nbprobe"] == "(this session)"
    from localearn import expr

    built = expr.build("mlaan(nbprobe, k=2)")
    assert isinstance(built, MLAAN) and isinstance(built.base, NotebookProbe)
    with pytest.raises(localearn.UserError, match="expected a subclass of localearn.UpdateRule"):
        localearn.register_rule("bad", tiny_resnet)


def test_api_mistakes_are_user_errors(session, tmp_path):
    with pytest.raises(localearn.UserError, match="rule must be an expression"):
        localearn.fit(rule=42, output_dir=tmp_path)
    with pytest.raises(localearn.UserError, match="unknown model 'nope'"):
        localearn.fit(rule=NotebookProbe, model="nope", output_dir=tmp_path)


def test_console_logging_goes_to_stdout_and_stderr(monkeypatch, capsys):
    monkeypatch.setattr(LOGGER, "handlers", [])
    monkeypatch.setattr(LOGGER, "propagate", True)
    monkeypatch.setattr(LOGGER, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    console_logging()
    assert [type(h) for h in LOGGER.handlers] == [ConsoleHandler]
    LOGGER.info("an epoch line")
    LOGGER.warning("a short epoch")
    assert capsys.readouterr() == ("an epoch line\n", "localearn: warning: a short epoch\n")
    LOGGER.setLevel(logging.WARNING)  # how a caller silences it
    LOGGER.info("hidden")
    assert capsys.readouterr().out == ""


def test_console_logging_leaves_a_callers_setup_alone(monkeypatch):
    mine = logging.NullHandler()
    monkeypatch.setattr(LOGGER, "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [mine])
    console_logging()
    assert LOGGER.handlers == []  # records go to the caller's root handler


class Stores(localearn.LocalRule):
    """A rule that keeps one option and drops another."""

    def __init__(self, width: float = 1.0, depth: int = 2) -> None:
        self.width = width

    def make_head(self, index, num_modules, shape, info):
        return LinearProbeHead(shape, info)


def test_rule_objects_are_recorded_with_their_options(session):
    from localearn_plugins.dgl import DGL

    from localearn.api import rule_expression

    localearn.register_rule("probe", NotebookProbe)
    # MLAAN keeps its options as attributes but for leaps (parsed into a table): said
    text, problems = rule_expression(MLAAN(NotebookProbe(), k=2))
    assert text == "mlaan(probe, k=2)"
    assert "mlaan's option 'leaps' is not stored as an attribute" in problems
    assert all(p.startswith("mlaan's option") for p in problems)
    text, problems = rule_expression(MLAAN(DGL(width=2.0, max_width=64), k=1, fuse=False))
    assert all(p.startswith("mlaan's option") for p in problems)
    assert text == "mlaan(dgl(width=2.0, max_width=64), k=1, fuse=false)"
    from localearn import expr

    rebuilt = expr.build(text)  # the expression rebuilds the object
    assert (rebuilt.k, rebuilt.fuse, rebuilt.base.width) == (1, False, 2.0)
    assert rule_expression(MLAAN(NotebookProbe()))[0] == "mlaan(probe)"
    assert rule_expression(DGL(width=2.0)) == ("dgl(width=2.0)", [])
    # what cannot be rebuilt is said, not hidden
    text, problems = rule_expression(Stores(width=2.0, depth=5))
    assert text == "stores(width=2.0)"
    assert any("not registered" in p for p in problems)
    assert any("'depth' is not stored" in p for p in problems)


def test_resume_takes_the_stored_settings(session, captured, tmp_path):
    run = tmp_path / "run"
    first = localearn.fit(rule="dgl", k=2, output_dir=run, **{**BUDGET, "epochs": 1,
                                                               "train_limit": 96})
    assert first.summary["config"]["train_limit"] == 96
    # finished: resuming it again is refused in one line, its summary left alone
    before = (run / "summary.json").read_text()
    with pytest.raises(localearn.UserError, match=r"is finished \(1 epoch of 1 done\)"):
        localearn.fit(resume=str(run))
    assert (run / "summary.json").read_text() == before
    # more epochs: no k=, no model=, the stored train_limit kept
    more = localearn.fit(resume=str(run), epochs=2)
    cfg = more.summary["config"]
    assert (cfg["k"], cfg["model"], cfg["train_limit"], cfg["epochs"]) == (2, "tiny", 96, 2)
    assert len(more.history) == 2 and more.run_dir == run
