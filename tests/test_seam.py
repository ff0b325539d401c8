"""The seam between engine and rules: an explicit step context, one host read per step, what
--compile compiles, fit flags generated from the config, the registry's one-line errors, and an
import graph without cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from localearn import registry
from localearn.build import build_network, build_run
from localearn.cli import build_parser, main
from localearn.config import FitConfig, make_config
from localearn.engine.step import LegacyRuleWarning, Step
from localearn.interfaces import (
    AuxHead,
    DataInfo,
    LocalRule,
    PlainContext,
    StepContext,
    StepResult,
)

ROOT = Path(__file__).resolve().parents[1]
INFO = DataInfo(10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def small_run(rule: str, k: int = 4, **extra):
    cfg = make_config(rule=rule, k=k, device="cpu", progress=False, **extra)
    return build_run(cfg, info=INFO)


# ---------------------------------------------------------------------------- import graph
def _module_imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports anywhere: at module level, inside
    functions and under TYPE_CHECKING alike (counted strictly: a cycle hidden in a function
    or behind a type-checking guard is still a cycle of the design)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(package))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.startswith(package):
            # ``from pkg import sub`` needs the submodule sub; ``from mod import name``, mod
            out.update(f"{node.module}.{a.name}" for a in node.names)
            out.add(node.module)
    return out


def test_the_core_has_no_import_cycle():
    files = {}
    for path in (ROOT / "localearn").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        files[".".join(parts)] = path
    graph = {}
    for name, path in files.items():
        found = _module_imports(path, "localearn")
        # "from pkg import sub": a dependency on sub, not on all of pkg
        deps = {d for d in found if d in files and d != name
                and not any(f.startswith(d + ".") and f in files for f in found)}
        # importing a submodule first runs its package's __init__
        for d in list(deps):
            while "." in d:
                d = d.rsplit(".", 1)[0]
                # every module needs the root package; any other parent runs its __init__
                if d != "localearn" and d in files and d != name \
                        and not name.startswith(d + "."):
                    deps.add(d)
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, dep]))
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
    assert {"localearn.network", "localearn.build", "localearn.engine.step",
            "localearn.engine.loop", "localearn.engine.state",
            "localearn.engine.checkpoint"} <= set(graph)


# ------------------------------------------------------------------------ step context
class OldStyle(LocalRule):
    """A third-party rule written against the three-argument train_step."""

    def make_head(self, index, num_modules, shape, info):
        return PoolHead(shape, info)

    def train_step(self, net, images, targets):
        x, local = images, []
        for i, module in enumerate(net.local_modules):
            out = module(x.detach())
            loss = (self.heads[i].loss(out, targets, images) if i < net.k - 1
                    else nn.functional.cross_entropy(out, targets))
            self.backward(loss)
            self.notify_grads_ready(list(module.parameters()))
            local.append(loss.item())
            x = out
        return StepResult(loss=local[-1], logits=out.detach(), local_losses=local[:-1])


class PoolHead(AuxHead):
    def __init__(self, shape, info):
        super().__init__(shape, info)
        self.fc = nn.Linear(shape[0], info.num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))

    def loss(self, features, targets, images):
        return nn.functional.cross_entropy(self(features), targets)


class SpyContext(PlainContext):
    def __init__(self):
        self.backwards = 0
        self.ready: list[int] = []

    def backward(self, loss, *, retain_graph=False):
        self.backwards += 1
        super().backward(loss, retain_graph=retain_graph)

    def grads_ready(self, params):
        self.ready.append(len(list(params)))


def test_old_three_argument_rule_still_trains_with_one_deprecation_warning():
    torch.manual_seed(0)
    rule = OldStyle()
    net = build_network("resnet32", 4, rule, 10, INFO.input_shape)
    aux = rule.setup(net, INFO)
    opt = torch.optim.SGD([*net.parameters(), *aux.parameters()], lr=0.05)
    with pytest.warns(LegacyRuleWarning, match="train_step\\(ctx, net, images, targets\\)"):
        step = Step(rule, net, opt, torch.device("cpu"))
    spy = SpyContext()
    step.ctx = spy  # the legacy rule's self.backward / notify_grads_ready go through it
    images, targets = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning per step
        first = step(images, targets)
        for _ in range(8):
            last = step(images, targets)
    assert spy.backwards == 9 * 4 and len(spy.ready) == 9 * 4
    assert last[0] < first[0]  # the final loss fell on the repeated batch
    assert rule._legacy_ctx is None  # lent for the step only


def test_rules_use_only_the_context_for_backward_and_readiness():
    # every first-party rule: as many announcements as modules (MLAAN: heads too), each
    # backward through the context; a rule that called loss.backward() itself would escape it
    for text, k in [("bp", 1), ("dgl", 4), ("infopro", 4), ("mlaan(dgl, k=2, p=1)", 4)]:
        run = small_run(text, k)
        spy = SpyContext()
        result = run.rule.train_step(spy, run.net, torch.randn(8, 3, 32, 32),
                                     torch.arange(8) % 10)
        assert spy.backwards >= k and len(spy.ready) >= k, text
        assert isinstance(result.loss, torch.Tensor) and not result.loss.requires_grad
        assert all(isinstance(v, torch.Tensor) for v in result.local_losses)
        assert len(result.local_losses) == k - 1
        assert isinstance(spy, StepContext)


@pytest.mark.parametrize("text", ["dgl", "mlaan(dgl, k=2, p=1)"])
def test_one_step_reads_the_host_once(text, monkeypatch):
    run = small_run(text, k=6)
    images, targets = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    run.step(images, targets)  # warm-up
    calls: list[str] = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    totals = run.step(images, targets)
    monkeypatch.undo()
    assert calls == ["tolist"], calls  # not one per module: K-1 local losses stay on device
    assert len(totals) == 3 + 5


# ------------------------------------------------------------------------------ compile
def _compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("text", ["dgl", "infopro", "mlaan(dgl, k=2, p=2)",
                                  "mlaan(infopro, k=2, p=1)"])
def test_compile_reaches_every_module_that_does_work(text):
    run = small_run(text, k=4, compile=True)  # torch.compile is lazy: nothing runs here
    assert all(_compiled(m) for m in run.net.local_modules)
    covered: set[int] = set()
    for module in run.aux.modules():
        if _compiled(module):
            covered.update(id(p) for p in module.parameters())
    missing = [n for n, p in run.aux.named_parameters() if id(p) not in covered]
    assert not missing, missing  # every auxiliary parameter sits in a compiled module
    if "infopro" in text:  # the parts InfoPro's loss calls directly
        heads = [m for m in run.aux.modules() if type(m).__name__ == "InfoProHead"]
        assert heads and all(_compiled(h.classifier) for h in heads if h.classifier is not None)
        assert all(_compiled(h.decoder) for h in heads if h.decoder is not None)
    if "mlaan" in text:
        assert all(_compiled(b) for c in run.rule.copies for b in c)
        assert all(_compiled(t) for t in run.rule.twins.values())


# --------------------------------------------------------------------------- fit flags
def test_every_config_field_has_a_fit_flag():
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    dests = {a.dest for a in fit._actions}
    assert set(FitConfig.model_fields) <= dests
    args = build_parser().parse_args(["fit", "--momentum", "0.8", "--no-nesterov",
                                      "--warmup-lr", "0.02", "--channels-last", "--resume"])
    assert (args.momentum, args.nesterov, args.warmup_lr) == (0.8, False, 0.02)
    assert args.channels_last is True and args.resume == "latest" and args.lr is None


def test_fit_help_names_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in ("--warmup-lr", "(default: 0.01)", "--no-nesterov", "--momentum"):
        assert text in out


# ----------------------------------------------------------------------------- registry
def _dist(site: Path, name: str, entry: str) -> None:
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[localearn.rules]\n{entry}\n")


def test_plugin_of_the_wrong_kind_and_a_broken_one_are_one_line(tmp_path, monkeypatch):
    _dist(tmp_path, "wrongkind", "notarule = os.path:join")
    _dist(tmp_path / "b", "brokenplug", "broken = no_such_module_xyz:Rule")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    from localearn.errors import UserError

    with pytest.raises(UserError, match="'wrongkind'.*not a subclass of localearn.UpdateRule"):
        registry.load("rule", "notarule")
    with pytest.raises(UserError, match="'brokenplug' failed to load.*ModuleNotFoundError"):
        registry.load("rule", "broken")
    rows = dict(registry.listing("rule"))
    assert rows["notarule"].startswith("(broken:") and "dgl" in rows


def test_two_distributions_registering_one_name_warn_naming_both(tmp_path, monkeypatch):
    _dist(tmp_path / "a", "firstpkg", "twice = localearn_plugins.dgl:DGL")
    _dist(tmp_path / "b", "secondpkg", "twice = localearn_plugins.bp:BP")
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    with pytest.warns(RuntimeWarning, match="'firstpkg' and 'secondpkg'"):
        eps = registry.available("rule")
    assert eps["twice"].value == "localearn_plugins.dgl:DGL"  # the first on sys.path


def test_rules_listing_names_the_providing_distribution():
    r = subprocess.run([sys.executable, "-m", "localearn", "rules"], capture_output=True,
                       text=True, check=True)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("dgl "))
    assert "localearn" in line.split()[1]


def test_measure_builds_what_fit_builds():
    # memory and bench train a run from build_run: same parameters, same optimizer settings
    from localearn.measure import RunSpec, TrainingRun

    spec = RunSpec(rule="mlaan(dgl, k=2, p=1)", k=4, batch_size=4)
    measured = TrainingRun(spec, torch.device("cpu"))
    built = small_run("mlaan(dgl, k=2, p=1)", 4, batch_size=4)
    assert [p.shape for p in measured.params] == [p.shape for p in built.params]
    assert measured.optimizer.defaults == built.optimizer.defaults
    assert isinstance(measured.step(), float)


def test_engine_exports_resolve_lazily():
    code = textwrap.dedent("""
        import localearn.engine as e
        assert {"Trainer", "Step", "RunState", "fit"} <= set(e.__all__)
        assert e.Step.__module__ == "localearn.engine.step"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ reported metrics
def test_runs_report_last_and_best_and_seeds_report_mean_and_spread(tmp_path, capsys):
    import json

    out = tmp_path / "rep"
    code = main(["fit", "--rule", "dgl", "--k", "2", "--epochs", "2", "--train-limit", "64",
                 "--test-limit", "64", "--batch-size", "32", "--device", "cpu",
                 "--no-progress", "--seeds", "3,4", "--output-dir", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [3, 4]
    for seed, last, best in zip((3, 4), summary["test_acc"], summary["best_test_acc"]):
        run = json.loads((out / f"seed-{seed}" / "summary.json").read_text())
        rows = [json.loads(r) for r in (out / f"seed-{seed}" / "metrics.jsonl").read_text()
                .splitlines()]
        epochs = [r for r in rows if "test_acc" in r]
        assert run["seed"] == seed and run["last_test_acc"] == last == epochs[-1]["test_acc"]
        assert best == run["best_test_acc"] == max(r["test_acc"] for r in epochs)
        assert epochs[-1]["best_test_acc"] == best and run["best_epoch"] in (1, 2)
    mean = (summary["test_acc"][0] + summary["test_acc"][1]) / 2
    assert abs(summary["test_acc_mean"] - mean) < 1e-12
    assert f"last test accuracy over seeds [3, 4]: {mean:.2%}" in stdout
    assert main(["fit", "--seeds", "1,x"]) == 2
