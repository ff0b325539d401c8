"""Plugin authoring: mistakes are one line naming the plugin, and the isolation check is
reusable (`localearn.testing.check_isolation`) and has teeth."""

import sys
import textwrap
from pathlib import Path

import pytest
from localearn_plugins.dgl import DGLHead
from torch import nn

from localearn.cli import main
from localearn.interfaces import LocalRule, StepResult, UpdateRule
from localearn.testing import check_isolation

# a third-party package with one mistake per rule, registered by a throwaway dist-info
BADPLUG = '''
from torch import nn
from localearn import AuxHead, LocalRule, UpdateRule

class RaisingInit(LocalRule):
    def __init__(self):
        super().__init__()
        raise RuntimeError("cannot find my config file")

    def make_head(self, index, num_modules, shape, info):
        raise NotImplementedError

class FlatHead(AuxHead):
    def __init__(self, shape, info):
        super().__init__(shape, info)
        # the author's mistake: a feature shape is (C, H, W), there is no shape[3]
        self.fc = nn.Linear(shape[0] * shape[1] * shape[3], info.num_classes)

    def loss(self, features, targets, images):
        return nn.functional.cross_entropy(self.fc(features.flatten(1)), targets)

class RaisingHead(LocalRule):
    def make_head(self, index, num_modules, shape, info):
        return FlatHead(shape, info)

class WrongReturn(UpdateRule):
    def train_step(self, ctx, net, images, targets):
        logits = net(images)
        loss = nn.functional.cross_entropy(logits, targets)
        ctx.backward(loss)
        return loss.detach(), logits.detach()  # a tuple, not a StepResult

class WithInt(UpdateRule):
    def __init__(self, hidden: int = 8):
        self.hidden = hidden

    def train_step(self, ctx, net, images, targets):
        raise NotImplementedError
'''
ENTRIES = """[localearn.rules]
raising_init = badplug:RaisingInit
raising_head = badplug:RaisingHead
wrong_return = badplug:WrongReturn
withint = badplug:WithInt
typo = badplug:WrongReturnn
"""


@pytest.fixture
def badplug(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    info = site / "badplug-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: badplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRIES)
    (site / "badplug.py").write_text(textwrap.dedent(BADPLUG))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "badplug", raising=False)
    return site


def fit_args(rule: str, out: Path, k: int = 2) -> list[str]:
    return ["fit", "--rule", rule, "--k", str(k), "--epochs", "1", "--train-limit", "64",
            "--test-limit", "32", "--batch-size", "32", "--no-progress", "--device", "cpu",
            "--output-dir", str(out)]


@pytest.mark.parametrize("rule, k, expected", [
    ("raising_init", 2, ["rule 'raising_init' failed while being built",
                         "RuntimeError: cannot find my config file", "badplug.py:"]),
    ("raising_head", 2, ["rule 'raising_head' (badplug.RaisingHead, package 'badplug')",
                         "make_head", "feature shape (C, H, W)", "must return an AuxHead",
                         "IndexError", "badplug.py:"]),
    ("wrong_return", 1, ["rule 'wrong_return' (badplug.WrongReturn, package 'badplug')",
                         "train_step returned tuple", "expected a localearn.StepResult"]),
    ("typo", 2, ["rule 'typo' of package 'badplug' failed to load from 'badplug:WrongReturnn'",
                 "AttributeError"]),
    ("withint(hidden=true)", 1, ["option 'hidden' of rule 'withint'", "valid integer"]),
])
def test_authoring_mistakes_are_one_line_naming_the_plugin(badplug, tmp_path, capsys, rule, k,
                                                           expected):
    code = main(fit_args(rule, tmp_path / "run", k))  # python -m localearn exits with it
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localearn: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])


# ------------------------------------------------------------------- check_isolation
class Leaky(LocalRule):
    """DGL's heads, but each module runs on its predecessor's output without detaching it:
    module i's loss flows back into modules 0..i-1 (the mistake the check must catch)."""

    def make_head(self, index, num_modules, shape, info):
        return DGLHead(shape, info)

    def losses(self, net, images, targets):
        x = images
        for i, module in enumerate(net.local_modules):
            x = module(x)  # no .detach()
            if i < net.k - 1:
                yield self.heads[i].loss(x, targets, images), x
            else:
                yield nn.functional.cross_entropy(x, targets), x

    def train_step(self, ctx, net, images, targets):
        local, logits = [], None
        for loss, out in self.losses(net, images, targets):
            ctx.backward(loss, retain_graph=True)
            local.append(loss.detach())
            logits = out.detach()
        return StepResult(loss=local[-1], logits=logits, local_losses=local[:-1])


class Lazy(LocalRule):
    """Trains the last module only: the other modules never receive a gradient."""

    def make_head(self, index, num_modules, shape, info):
        return DGLHead(shape, info)

    def train_step(self, ctx, net, images, targets):
        with_grad = net.local_modules[-1]
        x = images
        with_grad_out = None
        for module in net.local_modules:
            x = module(x.detach()) if module is with_grad else module(x).detach()
            with_grad_out = x
        loss = nn.functional.cross_entropy(with_grad_out, targets)
        ctx.backward(loss)
        return StepResult(loss=loss.detach(), logits=with_grad_out.detach())


def test_check_isolation_passes_a_local_rule_and_mlaan_within_its_cascade():
    check_isolation("dgl", k=4)
    check_isolation("mlaan(dgl, k=2, p=1)", k=4, reach=2)


def test_check_isolation_catches_a_cascade_wider_than_allowed():
    # MLAAN's cascade of depth 2 trains module i from module i+1's loss: reach 1 must fail
    with pytest.raises(AssertionError, match="not gradient-isolated.*local module 0"):
        check_isolation("mlaan(dgl, k=2, p=1)", k=4, reach=1)


def test_check_isolation_catches_a_leaky_rule():
    with pytest.raises(AssertionError, match=r"Leaky.*not gradient-isolated: the gradient of "
                                             r"local module 0 .* detach each module's input"):
        check_isolation(Leaky(), k=3)


def test_check_isolation_catches_an_untrained_module():
    with pytest.raises(AssertionError, match=r"module\(s\) \[0, 1\] received no gradient"):
        check_isolation(Lazy(), k=3)


def test_check_isolation_refuses_a_wrong_step_result():
    class TupleStep(UpdateRule):
        def train_step(self, ctx, net, images, targets):
            return net(images)

    from localearn.errors import UserError

    with pytest.raises(UserError, match="train_step returned Tensor, expected a "
                                        "localearn.StepResult"):
        check_isolation(TupleStep(), k=2)


def test_checking_a_steps_result_reads_no_entry_points(monkeypatch):
    # naming the rule's package reads every installed entry point (milliseconds): only an
    # error line may do it, never the check of every training step
    import torch

    from localearn import expr, registry
    from localearn.engine.step import check_step_result
    from localearn.errors import UserError

    def no_scan(**kw):
        raise AssertionError("entry points read while checking a step")

    rule = expr.build("dgl")
    targets = torch.zeros(4, dtype=torch.long)
    good = StepResult(loss=torch.tensor(1.0), logits=torch.zeros(4, 10), local_losses=[])
    monkeypatch.setattr(registry, "entry_points", no_scan)
    assert check_step_result(rule, good, targets) is good
    monkeypatch.undo()
    bad = StepResult(loss=torch.tensor(1.0), logits=torch.zeros(3, 10), local_losses=[])
    with pytest.raises(UserError, match=r"rule 'dgl' \(localearn_plugins\.dgl\.DGL"):
        check_step_result(rule, bad, targets)
